// SGLD chains of the study's MLP on the CPU: the whole step fused, one chain per OpenMP thread at a time,
// all of a chain's steps in a row with its weights and scratch in cache (backend ``native``,
// fastllc/backends/native.py, which compiles this file on first use: fastllc/native_build.py).
//
// Plain C++17, no PyTorch headers; called through ctypes on contiguous float32/float64/int64 buffers.
// The same source is compiled three ways: a portable build (baseline flags, any CPU: "scalar"), one with
// -mavx2 -mfma ("avx2") and one that adds AVX-512 F/DQ/VL/BW ("avx512"). The arithmetic is written on
// 8-float vectors (GCC/Clang vector extensions, v8 below): AVX registers and FMA instructions in the vector
// builds, what the baseline ISA has (SSE2 pairs on x86-64) in the portable one; the products and the GELU
// and softmax passes on 16-float vectors (v16: 512-bit registers and FMAs) in the AVX-512 build. Intrinsics
// appear only where the extensions cannot say it (the noise's 64-bit hashing, fast_normals). All build with
// -ffp-contract=off, so that the random streams round exactly as Numba's (fastllc/sampling/randomness.py);
// the hot loops ask for fused multiply-adds explicitly (madd, MADD), which the portable build computes as
// a multiply and an add.
//
// One step of chain c (canonical parameter order of fastllc/model.py: E [p,e], L [h,e], b_L [h],
// R [h,e], b_R [h], U [p,h]; the chain's weights w [d] are contiguous):
//   z_i = L E[a_i] + R E[b_i] + b_L + b_R,  u = GELU(z) (exact erf),  s_i = U u_i
//   L_m = mean_i (logsumexp(s_i) − s_i[y_i])          (never the log of an underflowed probability)
//   δs = (softmax(s) − onehot(y)) / m, the hand-written backward to ∇L_m,
//   Δ = −(εγ/2)(w − w*) − (ε·nβ/2)∇L_m + √ε ξ,  Δ −= (Δ·g)g (orthogonal),  Δ ⊙= moves (restricted),  w += Δ
// or, with the published chain loss, L_m = −mean_i log(p_i + δ), p_i = exp(s_i[y_i] − logsumexp(s_i)), whose
// δs_i is cross-entropy's times p_i/(p_i + δ); L_m is recorded at w_t before each update; at the first non-finite loss the chain stops (its trace
// stays NaN from there, its weights are those at which the loss blew up: as the reference).
//
// Randomness: either injected (indices [C, T, m] and unit noise [C, T, d], for tests), or drawn here
// exactly as CounterRandomness draws it: SplitMix64 words keyed by (seed, stream, chain, step), Lemire's
// multiply-shift for indices, Doornik's 256-layer ziggurat (tables passed in from Python) for the noise.
// Transcendentals: exp and the GELU's Φ (one exp and a fitted polynomial) are vectorised approximations of
// our own with the error bounds stated where they are defined (expn, gelun); one logf per example is the C
// library's. The ziggurat's wedge test uses the C library's double exp and log, or (vector builds) a double
// exp of our own whose error is far below the margin its decisions need (exp_wedge).
//
// Layout of a step (loss_and_gradient): the minibatch's m examples are the vector lanes. Every product is one
// register-blocked tile kernel (gemm: 6 rows × 2 v8 of accumulators, or 12 rows × 2 v16 with AVX-512) that
// reads the weights in place through strides. Noise: 2,696 normals per chain-step, eight hashes at a time,
// the ~1.4% outside their layer's rectangle in a second pass (fill_normal). The subnormal floats of confident
// predictions are flushed to zero inside the kernel (FlushDenormals: Intel computes them in microcode).
// Measured at the published shape (p = 53, e = 8, h = 32, m = 64), one thread, on the project's Zen 4
// machine (v8 only): a chain-step took 14.8 µs with AVX-512 (loss and gradient 11.2, noise 2.9) and 16.4 µs
// with AVX2 (noise 4.1); v16 takes the loss and gradient ~16% lower again (see tile_rows; the three large
// products 8.1 -> 6.3 µs, 104 GFLOP/s).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__SSE__)  // x86: the MXCSR control register (flush-to-zero, denormals-are-zero)
#include <xmmintrin.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__FMA__)
#define MADD(a, b, c) std::fma((a), (b), (c))
#if defined(__AVX512F__)
#define FASTLLC_VARIANT "avx512"
#else
#define FASTLLC_VARIANT "avx2"
#endif
#else
#define MADD(a, b, c) ((a) * (b) + (c))
#define FASTLLC_VARIANT "scalar"
#endif

namespace {

constexpr uint64_t GOLDEN = 0x9E3779B97F4A7C15ull;
constexpr uint64_t MIX1 = 0xBF58476D1CE4E5B9ull;
constexpr uint64_t MIX2 = 0x94D049BB133111EBull;
constexpr uint64_t NOISE_STREAM = 1, INDEX_STREAM = 2;
constexpr unsigned WORDS_PER_ELEMENT_SHIFT = 20;

inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * MIX1;
    z = (z ^ (z >> 27)) * MIX2;
    return z ^ (z >> 31);
}

inline uint64_t stream_key(int64_t seed, uint64_t stream, int64_t chain, int64_t step) {
    uint64_t key = mix64(static_cast<uint64_t>(seed) + GOLDEN * stream);
    key = mix64(key + GOLDEN * static_cast<uint64_t>(chain + 1));
    return mix64(key + GOLDEN * static_cast<uint64_t>(step + 1));
}

inline uint64_t word_of(uint64_t key, int64_t element, int64_t j) {
    return mix64(key + GOLDEN * ((static_cast<uint64_t>(element) << WORDS_PER_ELEMENT_SHIFT) + static_cast<uint64_t>(j)));
}

inline float signed_unit(uint64_t word) {  // [-1, 1) from the top 24 bits (the product is exact)
    return static_cast<float>(static_cast<int64_t>(word >> 40)) * (1.0f / 8388608.0f) - 1.0f;
}

inline double uniform01(uint64_t word) {  // (0, 1] from the top 53 bits
    return static_cast<double>((word >> 11) + 1) * (1.0 / 9007199254740992.0);
}

struct Ziggurat {
    const double* edges;    // [257]
    const float* edges32;   // [257]
    const float* ratios;    // [256]
    const double* density;  // [257]
    double tail;
    uint64_t pairs[256];    // ratios[i]'s bits | edges32[i]'s << 32: one 64-bit gather fetches both
    Ziggurat(const double* edges_, const float* edges32_, const float* ratios_, const double* density_, double tail_)
        : edges(edges_), edges32(edges32_), ratios(ratios_), density(density_), tail(tail_) {
        for (int i = 0; i < 256; ++i) {
            uint32_t ratio, edge;
            std::memcpy(&ratio, ratios + i, 4), std::memcpy(&edge, edges32 + i, 4);
            pairs[i] = ratio | static_cast<uint64_t>(edge) << 32;
        }
    }
};

// randomness.py's _normal_slow, whose first iteration is _fill_noise's fast path: the same value.
float normal(const Ziggurat& z, uint64_t key, int64_t element) {
    int64_t j = 0;
    while (true) {
        uint64_t word = word_of(key, element, j);
        j += 1;
        int layer = static_cast<int>(word & 255u);
        float u = signed_unit(word);
        if (std::fabs(u) < z.ratios[layer]) return u * z.edges32[layer];
        if (layer == 0) {
            while (true) {
                double x = std::log(uniform01(word_of(key, element, j))) / z.tail;
                double y = std::log(uniform01(word_of(key, element, j + 1)));
                j += 2;
                if (-2.0 * y >= x * x) return static_cast<float>(u < 0 ? x - z.tail : z.tail - x);
            }
        }
        double x = static_cast<double>(u) * z.edges[layer];
        double v = uniform01(word_of(key, element, j));
        j += 1;
        if (z.density[layer + 1] + v * (z.density[layer] - z.density[layer + 1]) < std::exp(-0.5 * x * x))
            return static_cast<float>(x);
    }
}

// Unit normals of elements 0 .. count−1 of the stream ``key`` into out, the same values as ``normal`` element by
// element, in two passes. The first computes every element's first word and its point in the layer's rectangle
// (_fill_noise's fast path, accepted for ~98.6% of elements) and lists the others without a branch; the second
// runs the full ziggurat for the listed ones (~40 per 2,696 elements). The first pass takes eight words at a
// time: in 64-bit lanes with AVX-512's 64-bit multiply, in two 4-lane halves with AVX2 (each 64-bit product
// from two 32-bit ones, see times), else one at a time; each element's ratio and edge in one 64-bit gather
// (Ziggurat::pairs: AVX2 4.26 -> 3.51 us, AVX-512 2.57 -> 2.44 us per 2,696 elements with the multiply
// above). rejected: room for count + 8 indices.
#if defined(__AVX512F__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
int64_t fast_normals(const Ziggurat& zig, uint64_t key, int64_t count, float* out, int32_t* rejected) {
    constexpr uint64_t stride = GOLDEN << WORDS_PER_ELEMENT_SHIFT;  // word_of(key, j + 1, 0) − word_of's argument
    __m512i base = _mm512_add_epi64(_mm512_set1_epi64(static_cast<int64_t>(key)),
                                    _mm512_mullo_epi64(_mm512_set1_epi64(stride), _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7)));
    const __m512i step = _mm512_set1_epi64(stride * 8), mix1 = _mm512_set1_epi64(MIX1), mix2 = _mm512_set1_epi64(MIX2);
    const __m512i byte = _mm512_set1_epi64(255);
    const __m256 unit = _mm256_set1_ps(1.0f / 8388608.0f), one = _mm256_set1_ps(1.0f);
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    int64_t j = 0, n = 0;
    for (; j + 8 <= count; j += 8) {
        __m512i z = base;  // mix64, lane by lane
        base = _mm512_add_epi64(base, step);
        z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 30)), mix1);
        z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 27)), mix2);
        z = _mm512_xor_si512(z, _mm512_srli_epi64(z, 31));
        const __m512i pair = _mm512_i64gather_epi64(_mm512_and_si512(z, byte), zig.pairs, 8);  // (ratio, edge) by layer
        const __m256 u = _mm256_sub_ps(_mm256_mul_ps(_mm512_cvtepi64_ps(_mm512_srli_epi64(z, 40)), unit), one);
        const __m256 ratio = _mm256_castsi256_ps(_mm512_cvtepi64_epi32(pair));
        const __m256 edge = _mm256_castsi256_ps(_mm512_cvtepi64_epi32(_mm512_srli_epi64(pair, 32)));
        _mm256_storeu_ps(out + j, _mm256_mul_ps(u, edge));
        const __mmask8 outside = _mm256_cmp_ps_mask(_mm256_and_ps(u, magnitude), ratio, _CMP_NLT_UQ);
        // compressed in a register: Zen 4's compressing store to memory is microcoded and slow
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(rejected + n), _mm256_maskz_compress_epi32(outside, lanes));
        n += __builtin_popcount(outside);
        lanes = _mm256_add_epi32(lanes, _mm256_set1_epi32(8));
    }
#elif defined(__AVX2__)
// z · M mod 2⁶⁴, lane by lane, M = high·2³² + low: low·z_lo in full (a 64-bit product of 32-bit halves), plus
// the cross terms high·z_lo + low·z_hi (mod 2³²) in the upper half, both from ONE 32-bit multiply of z by
// swapped = (high, low) per 64-bit lane (AMD's vpmulld is as cheap as vpmuludq; one shift less than three
// 64-bit products of halves).
inline __m256i times(__m256i z, __m256i low, __m256i swapped) {
    const __m256i cross = _mm256_mullo_epi32(z, swapped);  // 32-bit lanes: z_lo·high, z_hi·low
    const __m256i upper = _mm256_and_si256(_mm256_add_epi64(cross, _mm256_slli_epi64(cross, 32)),
                                           _mm256_set1_epi64x(static_cast<int64_t>(0xffffffff00000000ull)));
    return _mm256_add_epi64(_mm256_mul_epu32(z, low), upper);
}
inline __m256i mix64x4(__m256i z) {
    const __m256i low1 = _mm256_set1_epi64x(MIX1 & 0xffffffffu), swapped1 = _mm256_set1_epi64x((MIX1 >> 32) | (MIX1 << 32));
    const __m256i low2 = _mm256_set1_epi64x(MIX2 & 0xffffffffu), swapped2 = _mm256_set1_epi64x((MIX2 >> 32) | (MIX2 << 32));
    z = times(_mm256_xor_si256(z, _mm256_srli_epi64(z, 30)), low1, swapped1);
    z = times(_mm256_xor_si256(z, _mm256_srli_epi64(z, 27)), low2, swapped2);
    return _mm256_xor_si256(z, _mm256_srli_epi64(z, 31));
}
int64_t fast_normals(const Ziggurat& zig, uint64_t key, int64_t count, float* out, int32_t* rejected) {
    constexpr uint64_t stride = GOLDEN << WORDS_PER_ELEMENT_SHIFT;
    __m256i first = _mm256_setr_epi64x(static_cast<int64_t>(key), static_cast<int64_t>(key + stride),
                                       static_cast<int64_t>(key + 2 * stride), static_cast<int64_t>(key + 3 * stride));
    __m256i second = _mm256_add_epi64(first, _mm256_set1_epi64x(static_cast<int64_t>(4 * stride)));
    const __m256i step = _mm256_set1_epi64x(static_cast<int64_t>(8 * stride)), byte = _mm256_set1_epi64x(255);
    const __m256i interleave = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    const __m256 unit = _mm256_set1_ps(1.0f / 8388608.0f), one = _mm256_set1_ps(1.0f);
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const long long* pairs = reinterpret_cast<const long long*>(zig.pairs);
    int64_t j = 0, n = 0;
    for (; j + 8 <= count; j += 8) {
        const __m256i z0 = mix64x4(first), z1 = mix64x4(second);
        first = _mm256_add_epi64(first, step), second = _mm256_add_epi64(second, step);
        // each word's (ratio, edge) pair gathered by its low byte (the layer) in its own 64-bit lane; the top 24
        // bits (u), ratios and edges then as 32-bit lanes in element order
        const __m256i pair0 = _mm256_i64gather_epi64(pairs, _mm256_and_si256(z0, byte), 8);
        const __m256i pair1 = _mm256_i64gather_epi64(pairs, _mm256_and_si256(z1, byte), 8);
        const __m256i top = _mm256_permutevar8x32_epi32(
            _mm256_blend_epi32(_mm256_srli_epi64(z0, 40), _mm256_slli_epi64(_mm256_srli_epi64(z1, 40), 32), 0xAA), interleave);
        const __m256 u = _mm256_sub_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(top), unit), one);
        const __m256 ratio = _mm256_castsi256_ps(
            _mm256_permutevar8x32_epi32(_mm256_blend_epi32(pair0, _mm256_slli_epi64(pair1, 32), 0xAA), interleave));
        const __m256 edge = _mm256_castsi256_ps(
            _mm256_permutevar8x32_epi32(_mm256_blend_epi32(_mm256_srli_epi64(pair0, 32), pair1, 0xAA), interleave));
        _mm256_storeu_ps(out + j, _mm256_mul_ps(u, edge));
        for (int outside = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_and_ps(u, magnitude), ratio, _CMP_NLT_UQ)); outside;
             outside &= outside - 1)
            rejected[n++] = static_cast<int32_t>(j + __builtin_ctz(outside));
    }
#else
int64_t fast_normals(const Ziggurat& zig, uint64_t key, int64_t count, float* out, int32_t* rejected) {
    int64_t j = 0, n = 0;
#endif
    for (; j < count; ++j) {  // the rest one at a time
        const uint64_t word = word_of(key, j, 0);
        const int layer = static_cast<int>(word & 255u);
        const float u = signed_unit(word);
        out[j] = u * zig.edges32[layer];
        rejected[n] = static_cast<int32_t>(j);
        n += !(std::fabs(u) < zig.ratios[layer]);
    }
    return n;
}

// The vector builds' exp_wedge: Cody–Waite reduction by ln 2 (split in two), Taylor coefficients 1/13! .. 1/0!
constexpr double WEDGE_LOG2E = 1.4426950408889634, WEDGE_LN2_HIGH = 6.93147180369123816490e-01,
                 WEDGE_LN2_LOW = 1.90821492927058770002e-10;
constexpr double WEDGE_TAYLOR[14] = {1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0,
                                     1.0 / 362880.0, 1.0 / 40320.0, 1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0,
                                     1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0};

#if defined(__AVX512F__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
// exp(a) of 8 doubles a ∈ [−7, 0] (the wedge test's −x²/2, |x| ≤ 3.7): Cody–Waite reduction by ln 2, Taylor
// polynomial to degree 13; relative error ≤ 2.3e-16 measured on 10⁶ points of [−7, 0] against the C library's.
inline __m512d exp_wedge(__m512d a) {
    const __m512d n = _mm512_roundscale_pd(_mm512_mul_pd(a, _mm512_set1_pd(WEDGE_LOG2E)), 0x08);  // nearest
    __m512d r = _mm512_fnmadd_pd(n, _mm512_set1_pd(WEDGE_LN2_HIGH), a);
    r = _mm512_fnmadd_pd(n, _mm512_set1_pd(WEDGE_LN2_LOW), r);
    __m512d y = _mm512_set1_pd(WEDGE_TAYLOR[0]);
    for (int i = 1; i < 14; ++i) y = _mm512_fmadd_pd(y, r, _mm512_set1_pd(WEDGE_TAYLOR[i]));
    return _mm512_scalef_pd(y, n);
}

// The second pass: the ziggurat of the listed elements, eight at a time, in rounds (round k draws words 2k and
// 2k + 1 of each element still pending: its rectangle test, else its wedge test). The wedge accepts or
// rejects by exp_wedge only when the comparison clears its error by far (1e-13 relative); the tail layer and
// the (never yet seen) near ties go to ``normal``, which starts the element over: the same values.
void finish_normals(const Ziggurat& zig, uint64_t key, int32_t* pending, int64_t n, float* out) {
    const __m512i mix1 = _mm512_set1_epi64(MIX1), mix2 = _mm512_set1_epi64(MIX2), byte = _mm512_set1_epi64(255);
    int32_t scalar[56];  // for ``normal``: flushed before it could overflow (at most 8 added per vector)
    int64_t ns = 0;
    for (int64_t j = 0; n > 0; j += 2) {
        int64_t next = 0;  // rejected by their wedge: pending in the next round, in place
        for (int64_t i = 0; i < n; i += 8) {
            const __mmask8 live = static_cast<__mmask8>(n - i >= 8 ? 0xff : (1u << (n - i)) - 1);
            const __m256i element = _mm256_maskz_loadu_epi32(live, pending + i);
            const __m512i at = _mm512_add_epi64(
                _mm512_slli_epi64(_mm512_cvtepi32_epi64(element), WORDS_PER_ELEMENT_SHIFT), _mm512_set1_epi64(j));
            __m512i z = _mm512_add_epi64(_mm512_set1_epi64(static_cast<int64_t>(key)),
                                         _mm512_mullo_epi64(at, _mm512_set1_epi64(static_cast<int64_t>(GOLDEN))));
            __m512i w = _mm512_add_epi64(z, _mm512_set1_epi64(static_cast<int64_t>(GOLDEN)));  // word j + 1
            z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 30)), mix1);
            w = _mm512_mullo_epi64(_mm512_xor_si512(w, _mm512_srli_epi64(w, 30)), mix1);
            z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 27)), mix2);
            w = _mm512_mullo_epi64(_mm512_xor_si512(w, _mm512_srli_epi64(w, 27)), mix2);
            z = _mm512_xor_si512(z, _mm512_srli_epi64(z, 31));
            w = _mm512_xor_si512(w, _mm512_srli_epi64(w, 31));
            const __m512i layer = _mm512_and_si512(z, byte);
            const __m256i layer32 = _mm512_cvtepi64_epi32(layer);
            const __m256 u = _mm256_sub_ps(_mm256_mul_ps(_mm512_cvtepi64_ps(_mm512_srli_epi64(z, 40)),
                                                         _mm256_set1_ps(1.0f / 8388608.0f)), _mm256_set1_ps(1.0f));
            const __m256 ratio = _mm256_mmask_i32gather_ps(_mm256_setzero_ps(), live, layer32, zig.ratios, 4);
            const __m256 edge32 = _mm256_mmask_i32gather_ps(_mm256_setzero_ps(), live, layer32, zig.edges32, 4);
            const __m256 magnitude = _mm256_and_ps(u, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)));
            const __mmask8 inside = _mm256_mask_cmp_ps_mask(live, magnitude, ratio, _CMP_LT_OQ);
            const __mmask8 tail = live & ~inside & _mm512_cmpeq_epi64_mask(layer, _mm512_setzero_si512());
            const __mmask8 wedge = live & ~inside & ~tail;
            const __m512d zero = _mm512_setzero_pd();
            const __m512d x = _mm512_mul_pd(_mm512_cvtps_pd(u), _mm512_mask_i64gather_pd(zero, wedge, layer, zig.edges, 8));
            const __m512d v = _mm512_mul_pd(_mm512_cvtepu64_pd(_mm512_add_epi64(_mm512_srli_epi64(w, 11), _mm512_set1_epi64(1))),
                                            _mm512_set1_pd(1.0 / 9007199254740992.0));  // uniform01
            const __m512d upper = _mm512_mask_i64gather_pd(zero, wedge, layer, zig.density, 8);
            const __m512d lower = _mm512_mask_i64gather_pd(zero, wedge, _mm512_add_epi64(layer, _mm512_set1_epi64(1)), zig.density, 8);
            const __m512d height = _mm512_add_pd(lower, _mm512_mul_pd(v, _mm512_sub_pd(upper, lower)));  // as normal()
            const __m512d curve = exp_wedge(_mm512_mul_pd(_mm512_mul_pd(_mm512_set1_pd(-0.5), x), x));
            const __mmask8 below = _mm512_mask_cmp_pd_mask(wedge, height, _mm512_mul_pd(curve, _mm512_set1_pd(1 - 1e-13)), _CMP_LT_OQ);
            const __mmask8 above = _mm512_mask_cmp_pd_mask(wedge, height, _mm512_mul_pd(curve, _mm512_set1_pd(1 + 1e-13)), _CMP_GT_OQ);
            const __mmask8 unsure = wedge & ~below & ~above;
            const __m256 value = _mm256_mask_blend_ps(below, _mm256_mul_ps(u, edge32), _mm512_cvtpd_ps(x));
            _mm256_mask_i32scatter_ps(out, inside | below, element, value, 4);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(pending + next), _mm256_maskz_compress_epi32(above, element));
            next += __builtin_popcount(above);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(scalar + ns), _mm256_maskz_compress_epi32(tail | unsure, element));
            ns += __builtin_popcount(tail | unsure);
            if (ns > 48) {
                for (int64_t q = 0; q < ns; ++q) out[scalar[q]] = normal(zig, key, scalar[q]);
                ns = 0;
            }
        }
        n = next;
    }
    for (int64_t q = 0; q < ns; ++q) out[scalar[q]] = normal(zig, key, scalar[q]);
}
#elif defined(__AVX2__)
// exp(a) of 4 doubles a ∈ [−7, 0]: exp_wedge's reduction and polynomial (the same values), 2ⁿ (n ∈ [−11, 0])
// built in the exponent bits for want of AVX-512's scalef.
inline __m256d exp_wedge4(__m256d a) {
    const __m256d n = _mm256_round_pd(_mm256_mul_pd(a, _mm256_set1_pd(WEDGE_LOG2E)),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256d r = _mm256_fnmadd_pd(n, _mm256_set1_pd(WEDGE_LN2_HIGH), a);
    r = _mm256_fnmadd_pd(n, _mm256_set1_pd(WEDGE_LN2_LOW), r);
    __m256d y = _mm256_set1_pd(WEDGE_TAYLOR[0]);
    for (int i = 1; i < 14; ++i) y = _mm256_fmadd_pd(y, r, _mm256_set1_pd(WEDGE_TAYLOR[i]));
    const __m256i biased = _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_cvtpd_epi32(n)), _mm256_set1_epi64x(1023));
    return _mm256_mul_pd(y, _mm256_castsi256_pd(_mm256_slli_epi64(biased, 52)));
}

// The second pass in rounds as with AVX-512 (round k: words 2k and 2k + 1 of each pending element), eight
// elements at a time: their words hashed in general-purpose registers (AVX2 has no 64-bit multiply), the
// wedge tests' exps in one vector. Round 0 skips the rectangle test: the first pass saw it fail on the same
// word. The tail layer and near ties go to ``normal``: the same values.
void finish_normals(const Ziggurat& zig, uint64_t key, int32_t* pending, int64_t n, float* out) {
    for (int64_t j = 0; n > 0; j += 2) {
        int64_t next = 0;  // rejected by their wedge: pending in the next round, in place
        for (int64_t i = 0; i < n; i += 8) {
            alignas(32) double x[8] = {}, height[8] = {};
            int32_t element[8];
            int wedges = 0;
            for (int64_t l = i; l < std::min(i + 8, n); ++l) {
                const int32_t at = pending[l];
                const uint64_t word = word_of(key, at, j);
                const int layer = static_cast<int>(word & 255u);
                const float u = signed_unit(word);
                if (j > 0 && std::fabs(u) < zig.ratios[layer]) {
                    out[at] = u * zig.edges32[layer];
                } else if (layer == 0) {
                    out[at] = normal(zig, key, at);
                } else {
                    x[wedges] = static_cast<double>(u) * zig.edges[layer];
                    const double v = uniform01(word_of(key, at, j + 1));
                    height[wedges] = zig.density[layer + 1] + v * (zig.density[layer] - zig.density[layer + 1]);
                    element[wedges++] = at;
                }
            }
            if (wedges == 0) continue;
            int below = 0, above = 0;
            for (int half = 0; half < (wedges > 4 ? 2 : 1); ++half) {  // two independent vectors: their exps overlap
                const __m256d xs = _mm256_load_pd(x + 4 * half), heights = _mm256_load_pd(height + 4 * half);
                const __m256d curve = exp_wedge4(_mm256_mul_pd(_mm256_mul_pd(_mm256_set1_pd(-0.5), xs), xs));
                below |= _mm256_movemask_pd(_mm256_cmp_pd(heights, _mm256_mul_pd(curve, _mm256_set1_pd(1 - 1e-13)), _CMP_LT_OQ)) << 4 * half;
                above |= _mm256_movemask_pd(_mm256_cmp_pd(heights, _mm256_mul_pd(curve, _mm256_set1_pd(1 + 1e-13)), _CMP_GT_OQ)) << 4 * half;
            }
            for (int l = 0; l < wedges; ++l) {
                if (below >> l & 1) out[element[l]] = static_cast<float>(x[l]);
                else if (above >> l & 1) pending[next++] = element[l];
                else out[element[l]] = normal(zig, key, element[l]);
            }
        }
        n = next;
    }
}
#else
void finish_normals(const Ziggurat& zig, uint64_t key, const int32_t* pending, int64_t n, float* out) {
    for (int64_t i = 0; i < n; ++i) out[pending[i]] = normal(zig, key, pending[i]);
}
#endif

void fill_normal(const Ziggurat& zig, uint64_t key, int64_t count, float* out, int32_t* rejected) {
    finish_normals(zig, key, rejected, fast_normals(zig, key, count, out, rejected), out);
}

// Flush-to-zero and denormals-are-zero for the kernel's own work, the thread's previous mode restored after it
// (MXCSR is per thread: each OpenMP thread sets and restores its own; the caller's mode is never changed
// behind its back). Confidently classified examples make subnormal floats (softmax probabilities ~1e-40 and
// their products in δs and the backward), which Intel CPUs compute ~100x slower through microcode: a
// trained network ran at half an untrained one's rate. Flushing them changes nothing that matters: a
// subnormal term is below 2^-126, ~1e-31 of any weight's increment, and the exp's and GELU's floors are
// already normal floats (expn), so the trajectories follow the reference (torch, not flushing) within the
// same tolerances: measured with flushing, ≤ 1e-6 on the weights after 100 steps at p = 53, untrained and
// trained, every build. The streams are unchanged: the noise makes no subnormals. x86 only; elsewhere a no-op.
struct FlushDenormals {
#if defined(__SSE__)
    const unsigned saved = _mm_getcsr();
    FlushDenormals() { _mm_setcsr(saved | 0x8040u); }  // FTZ (bit 15) | DAZ (bit 6)
    ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

struct Shape {
    int64_t p, e, h, m, d;
    int64_t oE, oL, obL, oR, obR, oU;  // offsets of the parameters in a chain's weights
};

Shape make_shape(int64_t p, int64_t e, int64_t h, int64_t m) {
    Shape s{p, e, h, m, 0, 0, 0, 0, 0, 0, 0};
    s.oE = 0;
    s.oL = p * e;
    s.obL = s.oL + h * e;
    s.oR = s.obL + h;
    s.obR = s.oR + h * e;
    s.oU = s.obR + h;
    s.d = s.oU + p * h;
    return s;
}

// Eight floats, as GCC/Clang vector extensions: AVX registers in the vector build, pairs of SSE registers (or
// scalars) in the portable one. Buffers whose rows are loaded as vectors are padded to a multiple of 8 (m, e
// and h; see Scratch), so that no loop below has a tail.
typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

inline v8 load(const float* x) { v8 r; std::memcpy(&r, x, sizeof r); return r; }
inline void store(float* x, v8 v) { std::memcpy(x, &v, sizeof v); }
inline v8 splat(float x) { return v8{x, x, x, x, x, x, x, x}; }
inline v8 madd(v8 a, v8 b, v8 c) {
#if defined(__FMA__) && defined(__AVX__)
    return __builtin_ia32_vfmaddps256(a, b, c);
#else
    return a * b + c;
#endif
}
inline float sum8(v8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }
inline int64_t padded(int64_t x) { return (x + 7) / 8 * 8; }

// Sixteen floats (512-bit registers) in the AVX-512 build, for the products and the elementwise passes: lane
// for lane the same operations as on v8, so the same results.
#if defined(__AVX512F__)
#define FASTLLC_V16 1
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
inline v16 madd(v16 a, v16 b, v16 c) { return _mm512_fmadd_ps(a, b, c); }
#endif

// Either width: the integer vector of the same lanes, loads, stores and broadcasts.
template <typename V> struct Ints;
template <> struct Ints<v8> { typedef v8i type; typedef uint32_t unsigned_type __attribute__((vector_size(32))); };
#if defined(FASTLLC_V16)
template <> struct Ints<v16> { typedef v16i type; typedef uint32_t unsigned_type __attribute__((vector_size(64))); };
#endif
template <typename V> inline V vload(const float* x) { V r; std::memcpy(&r, x, sizeof r); return r; }
template <typename V> inline void vstore(float* x, V v) { std::memcpy(x, &v, sizeof v); }
template <typename V> inline V vsplat(float x) { return V{} + x; }
template <typename V> constexpr int lanes_of() { return sizeof(V) / sizeof(float); }

// The elementwise passes (GELU, softmax) work on N vectors at once, statement by statement over the N: N
// independent chains that hide the latency of the long polynomial and exp sequences. Lane for lane the same
// operations for any N, so the same results.
#define EACH for (int j_ = 0; j_ < N; ++j_)
#define X(a) a[j_]

// exp(x) for x ≤ 88, in place on N vectors (Cephes expf: Cody–Waite reduction by ln 2, a degree-5
// polynomial; relative error ≤ 2 ulp on [−87, 88], checked against the double-precision exp in
// tests/test_backend_native.py). Below −87.3 it returns ~1e-38 instead of 0 or a denormal: terms that small
// never change a float32 sum here. Every argument here is ≤ 0.01 (logits minus their maximum; GELU's
// −z²/2 − ln √(2π)), so there is no clamp above. The scaling by 2ⁿ adds n to the exponent bits of
// y = e^r in [0.7, 1.42] rather than multiplying (one floating-point operation less, the same bits): the
// clamp keeps n ≥ −126 with y ≥ 1 at n = −126, and x ≤ 88 keeps n ≤ 127, so the result is always a normal
// float; a NaN x stays NaN.
#if defined(__AVX__)
// max(a, b) (b when either is NaN) and floor, one instruction each
inline v8 max_second(v8 a, v8 b) { return __builtin_ia32_maxps256(a, b); }
inline v8 floor_of(v8 x) { return __builtin_ia32_roundps256(x, 0x09); }
#endif
#if defined(FASTLLC_V16)
inline v16 max_second(v16 a, v16 b) { return _mm512_max_ps(a, b); }
inline v16 floor_of(v16 x) { return _mm512_roundscale_ps(x, 0x09); }
#endif

template <int N, typename V = v8> inline void expn(V* x) {
    typedef typename Ints<V>::type VI;
    typedef typename Ints<V>::unsigned_type VU;  // unsigned: the shift and sum wrap, never overflow
    const auto splat = [](float x) { return vsplat<V>(x); };
    V fx[N], nf[N], y[N];
    VI n[N];
    EACH {
#if defined(__AVX__)
        X(x) = max_second(splat(-87.3f), X(x));  // as below: a NaN x stays NaN (second operand)
        X(fx) = madd(X(x), splat(1.44269504088896341f), splat(0.5f));
        X(nf) = floor_of(X(fx));  // as below in one instruction
        X(n) = __builtin_convertvector(X(nf), VI);
#else
        X(x) = X(x) < splat(-87.3f) ? splat(-87.3f) : X(x);
        X(fx) = madd(X(x), splat(1.44269504088896341f), splat(0.5f));
        X(n) = __builtin_convertvector(X(fx), VI);
        X(nf) = __builtin_convertvector(X(n), V);
        X(n) = X(nf) > X(fx) ? X(n) - 1 : X(n);  // floor
        X(nf) = __builtin_convertvector(X(n), V);
#endif
    }
    EACH X(x) = madd(X(nf), splat(-0.693359375f), X(x));
    EACH X(x) = madd(X(nf), splat(2.12194440e-4f), X(x));
    EACH X(y) = madd(splat(1.9875691500e-4f), X(x), splat(1.3981999507e-3f));
    EACH X(y) = madd(X(y), X(x), splat(8.3334519073e-3f));
    EACH X(y) = madd(X(y), X(x), splat(4.1665795894e-2f));
    EACH X(y) = madd(X(y), X(x), splat(1.6666665459e-1f));
    EACH X(y) = madd(X(y), X(x), splat(5.0000001201e-1f));
    EACH X(y) = madd(X(y), X(x) * X(x), X(x) + splat(1.0f));
    EACH X(x) = (V)((VU)X(y) + ((VU)X(n) << 23));  // y·2ⁿ: n added to y's exponent field (integer unit)
}

// GELU(z) = z·Φ(z) and GELU′(z) = Φ(z) + z·φ(z) of N vectors, exact-erf GELU as F.gelu, with ONE exp
// shared by Φ and φ: φ(z) = e^(−z²/2 − c), c = ln √(2π) (as a float), and the tail Φ(−|z|) = φ(z)·t·Q(t)
// with t = 1/(2.9 + |z|) in (0, 1/2.9] (so no second exp as with Numerical Recipes' erfcc, t·e^(poly(t) − x²)).
// Q, degree 8, is fitted to Φ(−|z|)/(φ(z)·t) for minimax RELATIVE error over z in [0, 13.2] (beyond, φ is
// expn's floor ~1e-38 and t·Q(t) → 0): Lawson's reweighted least squares in double precision against
// mpmath, the coefficients then rounded to float one at a time (low order first), refitting the rest;
// 2.9 is about the best offset for degree 8 and keeps the tail's sensitivity to the rounding of t low. Its
// relative error is 2.2e-8, so Φ keeps its relative accuracy in the negative tail. Measured against double
// precision on 16M points of z in [−20, 20] (and asserted in tests/test_backend_native.py): GELU absolute
// error ≤ 4e-7 everywhere (the rounding of z·Φ; torch's own CPU F.gelu: 1.2e-6), relative ≤ 1e-6 for
// |z| ≤ 5 and ≤ 2.5e-6 for |z| ≤ 10 (the rounding of −z²/2 − c inside exp; the portable build, without FMA,
// rounds it twice: 1.5e-6 and 5e-6; the erfcc form had 3e-6 and 1e-5); GELU′ absolute error ≤ 2.5e-7.
// Below z ≈ −13 GELU is < 1e-38 in magnitude and comes out as such tiny numbers. A NaN z gives NaN.
template <int N, typename V = v8> inline void gelun(const V* z, V* value, V* slope) {
    static const float coefficients[] = {1824.9675f, -1176.6511f, 281.26566f, -19.758118f, 19.882963f,
                                         7.1597633f, 2.9083364f, 0.99988157f};
    typedef typename Ints<V>::type VI;
    const auto splat = [](float x) { return vsplat<V>(x); };
    V t[N], poly[N], pdf[N];
    EACH {
        const V magnitude = (V)((VI)X(z) & 0x7fffffff);  // |z|, the sign bit cleared
        X(t) = splat(1.0f) / (splat(2.9f) + magnitude);
        X(pdf) = madd(splat(-0.5f) * X(z), X(z), splat(-0.9189385f));  // −z²/2 − ln √(2π)
        X(poly) = splat(-1032.8263f);
    }
    for (float coefficient : coefficients) EACH X(poly) = madd(X(poly), X(t), splat(coefficient));
    expn<N>(pdf);  // φ(z), shared by Φ and GELU′
    EACH {
        const V tail = X(t) * X(poly) * X(pdf);  // Φ(−|z|)
        const V cdf = X(z) < splat(0.0f) ? tail : splat(1.0f) - tail;
        X(value) = X(z) * cdf;
        X(slope) = madd(X(z), X(pdf), cdf);
    }
}

#undef EACH
#undef X

// The step's products, all of one form: C [M rows, NV vectors of 8] = A [M, K] · B [K, NV·8], with A read
// through strides (element (r, k) at A[r·ra + k·ka], so that the weights and their transposes are read in
// place) and broadcast, B's rows loaded as vectors. Register-blocked: a tile of MR rows × NR vectors stays
// in registers over the whole sum (enough independent accumulators to hide the FMA latency). K ≥ 1 (gemm): the
// loop is a do-while and steps pointers, so that GCC neither versions it on ka nor keeps the accumulators in
// a stack array around it (with a for loop it did both: the products took 7% longer). The vectors are V: v8,
// or v16 (512-bit) in the AVX-512 build; every output element is the same chain of fused multiply-adds over
// k in order whatever V and the tile, so the results are the same bits.
template <typename V, int MR, int NR>
inline void tile(const float* A, int64_t ra, int64_t ka, const float* B, int64_t ldb, int64_t K, float* C,
                 int64_t ldc) {
    constexpr int W = sizeof(V) / sizeof(float);
    V acc[MR][NR];
    for (int r = 0; r < MR; ++r)
        for (int n = 0; n < NR; ++n) acc[r][n] = vsplat<V>(0.0f);
    int64_t k = 0;
    do {
        V b[NR];
        for (int n = 0; n < NR; ++n) b[n] = vload<V>(B + W * n);
        for (int r = 0; r < MR; ++r) {
            const V a = vsplat<V>(A[r * ra]);
            for (int n = 0; n < NR; ++n) acc[r][n] = madd(a, b[n], acc[r][n]);
        }
        A += ka, B += ldb;
    } while (++k < K);
    for (int r = 0; r < MR; ++r)
        for (int n = 0; n < NR; ++n) vstore(C + r * ldc + W * n, acc[r][n]);
}

// Rows per tile. v8 (16 registers with AVX2): 6 rows × 2 vectors, 12 accumulators, 2 loaded rows of B, 1
// broadcast (measured at the published shape, with AVX2 and with AVX-512's 32 registers: 12 × 2, 8 × 3, 7 × 3,
// 6 × 4, 4 × 4, 4 × 3 and 3 × 4 were all slower). v16 (AVX-512's 32 registers): 12 rows × 2 vectors, 24
// accumulators + 2 rows of B + 1 broadcast = 27 registers, enough independent sums for two 512-bit FMA ports
// of latency 4 (Intel) with the B loads amortised over 12 rows; 12 × 1 where only one v16 of columns is
// left. On Zen 4 (512-bit FMAs as two 256-bit halves) the products take 16% less than with v8 tiles
// (loss and gradient 14.0 -> 11.8 us, one thread, the published shape), 12 × 2 and 8 × 2 alike, 6 × 2 2%
// slower: fewer instructions for the same FLOPs.
template <typename V, int NR> constexpr int tile_rows() { return sizeof(V) == 32 ? 6 : 12; }

template <typename V, int NR, int R = tile_rows<V, NR>()>
inline void tile_of(int64_t rows, const float* A, int64_t ra, int64_t ka, const float* B, int64_t ldb, int64_t K,
                    float* C, int64_t ldc) {  // tile<V, rows, NR>, 1 ≤ rows ≤ R
    if constexpr (R >= 1) {
        if (rows == R) tile<V, R, NR>(A, ra, ka, B, ldb, K, C, ldc);
        else tile_of<V, NR, R - 1>(rows, A, ra, ka, B, ldb, K, C, ldc);
    }
}

// Whole tiles, then the rest; a rest of under half a tile (too few accumulators to hide the FMA latency) is
// instead shared with the last whole tile as two tiles of half as many rows (v8, M = 32: 6+6+6+6+4+4).
template <typename V, int NR>
void gemm_columns(int64_t M, const float* A, int64_t ra, int64_t ka, const float* B, int64_t ldb, int64_t K,
                  float* C, int64_t ldc) {
    constexpr int64_t rows_per_tile = tile_rows<V, NR>();
    int64_t whole = M / rows_per_tile, r = 0;
    if (whole >= 1 && M % rows_per_tile != 0 && M % rows_per_tile < rows_per_tile / 2) whole -= 1;
    for (int64_t t = 0; t < whole; ++t, r += rows_per_tile)
        tile<V, rows_per_tile, NR>(A + r * ra, ra, ka, B, ldb, K, C + r * ldc, ldc);
    while (r < M) {
        const int64_t rows = M - r > rows_per_tile ? (M - r) / 2 : M - r;
        tile_of<V, NR>(rows, A + r * ra, ra, ka, B, ldb, K, C + r * ldc, ldc);
        r += rows;
    }
}

// C [M, 8·NV] (row stride ldc) = A [M, K] (strides ra, ka) · B [K, 8·NV] (row stride ldb)
void gemm(int64_t M, int64_t NV, int64_t K, const float* A, int64_t ra, int64_t ka, const float* B, int64_t ldb,
          float* C, int64_t ldc) {
    if (K < 1) {  // an empty sum (not at any shape the backends pass; the tiles need K ≥ 1)
        for (int64_t r = 0; r < M; ++r) std::memset(C + r * ldc, 0, sizeof(float) * 8 * NV);
        return;
    }
    int64_t n = 0;  // in vectors of 8
#if defined(FASTLLC_V16)
    for (; n + 4 <= NV; n += 4) gemm_columns<v16, 2>(M, A, ra, ka, B + 8 * n, ldb, K, C + 8 * n, ldc);
    for (; n + 2 <= NV; n += 2) gemm_columns<v16, 1>(M, A, ra, ka, B + 8 * n, ldb, K, C + 8 * n, ldc);
#endif
    for (; n + 2 <= NV; n += 2) gemm_columns<v8, 2>(M, A, ra, ka, B + 8 * n, ldb, K, C + 8 * n, ldc);
    if (n < NV) gemm_columns<v8, 1>(M, A, ra, ka, B + 8 * n, ldb, K, C + 8 * n, ldc);
}

// One thread's buffers, reused for every chain it runs. The minibatch's examples are the vector lanes
// ("…T" buffers: [rows, mp], mp = m padded to 8; the padding lanes hold a zero embedding and get zero
// weight in δs, so they add nothing to any gradient); ep, hp: e and h padded to 8. The padding rows and
// columns (LR's, EE's and ET's beyond e, zT's beyond h, u's beyond h) are zero and never written.
struct Scratch {
    int64_t mp, ep, hp;
    std::vector<float> LR, ET, EE, zT, gT, sT, u, gU, dzT, dEE, gLR, noise, inc;
    std::vector<int64_t> a, b, y;
    std::vector<float> grad;
    explicit Scratch(const Shape& S)
        : mp(padded(S.m)), ep(padded(S.e)), hp(padded(S.h)), LR(S.h * 2 * ep, 0.0f), ET(2 * ep * mp, 0.0f),
          EE(mp * 2 * ep, 0.0f), zT(hp * mp, 0.0f), gT(S.h * mp), sT(S.p * mp), u(mp * hp, 0.0f), gU(S.p * hp),
          dzT(S.h * mp), dEE(mp * 2 * ep), gLR(S.h * 2 * ep), noise(S.d), inc(S.d), a(S.m), b(S.m), y(S.m),
          grad(S.d) {}
};

// dst[0 .. n) = src[0 .. n), and dst[0 .. n) += src[0 .. n): a vector at a time, then the tail
inline void copy_row(float* dst, const float* src, int64_t n) {
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) store(dst + j, load(src + j));
    for (; j < n; ++j) dst[j] = src[j];
}
inline void add_row(float* dst, const float* src, int64_t n) {
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) store(dst + j, load(dst + j) + load(src + j));
    for (; j < n; ++j) dst[j] += src[j];
}

// dst [cols, ·] (row stride ldd) = src [rows, ·]ᵀ (row stride lds), both padded to whole 8 × 8 blocks: with
// AVX, eight loads, sixteen in-register shuffles and eight stores per block (vs. 64 scalar copies).
inline void transpose8(const float* src, int64_t lds, float* dst, int64_t ldd) {
#if defined(__AVX__)
    __m256 r[8], t[8];
    for (int i = 0; i < 4; ++i) {  // r[i] = rows i and i + 4, columns 0..3; r[i + 4]: columns 4..7
        r[i] = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(src + i * lds)), _mm_loadu_ps(src + (i + 4) * lds), 1);
        r[i + 4] = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(src + i * lds + 4)),
                                        _mm_loadu_ps(src + (i + 4) * lds + 4), 1);
    }
    for (int i = 0; i < 8; i += 4) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
        t[i + 2] = _mm256_unpacklo_ps(r[i + 2], r[i + 3]);
        t[i + 3] = _mm256_unpackhi_ps(r[i + 2], r[i + 3]);
        _mm256_storeu_ps(dst + i * ldd, _mm256_shuffle_ps(t[i], t[i + 2], 0x44));
        _mm256_storeu_ps(dst + (i + 1) * ldd, _mm256_shuffle_ps(t[i], t[i + 2], 0xEE));
        _mm256_storeu_ps(dst + (i + 2) * ldd, _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44));
        _mm256_storeu_ps(dst + (i + 3) * ldd, _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE));
    }
#else
    for (int i = 0; i < 8; ++i)
        for (int j = 0; j < 8; ++j) dst[j * ldd + i] = src[i * lds + j];
#endif
}

// dst [cols, rows] = src [rows, cols]ᵀ, rows and cols multiples of 8
inline void transpose(int64_t rows, int64_t cols, const float* src, int64_t lds, float* dst, int64_t ldd) {
    for (int64_t i = 0; i < rows; i += 8)
        for (int64_t j = 0; j < cols; j += 8) transpose8(src + i * lds + j, lds, dst + j * ldd + i, ldd);
}

// Examples i0 .. i0 + 8N − 1 (lanes of N vectors) of the logits k.sT [p, mp]: adds their loss to ``loss`` and
// overwrites their logits with δs = w_i·(softmax(s_i) − onehot(y_i)), w_i = 1/m for cross-entropy and
// p_y/(p_y + δ)/m for the published loss (δ = offset > 0), 0 in the padding lanes. False when a logit of a
// real example is not finite.
template <int N, typename V = v8>
bool softmax_block(const Shape& S, Scratch& k, int64_t i0, double offset, double& loss) {
    constexpr int W = lanes_of<V>();
    typedef typename Ints<V>::type VI;
    const auto splat = [](float x) { return vsplat<V>(x); };
    const int64_t p = S.p, m = S.m, mp = k.mp;
    float* sT = k.sT.data() + i0;
    V top[N], check[N], total[N], ex[N];
    for (int j = 0; j < N; ++j) top[j] = splat(-INFINITY), check[j] = total[j] = splat(0.0f);
    for (int64_t q = 0; q < p; ++q)
        for (int j = 0; j < N; ++j) {
            const V x = vload<V>(sT + q * mp + W * j);
            top[j] = x > top[j] ? x : top[j];
            check[j] += x;  // NaN when any logit is NaN or ±inf
        }
    const int lanes = static_cast<int>(std::min<int64_t>(W * N, m - i0));
    float label_shifted[W * N];
    for (int l = 0; l < lanes; ++l) label_shifted[l] = sT[k.y[i0 + l] * mp + l] - top[l / W][l % W];
    for (int64_t q = 0; q < p; ++q) {
        for (int j = 0; j < N; ++j) ex[j] = vload<V>(sT + q * mp + W * j) - top[j];
        expn<N>(ex);
        for (int j = 0; j < N; ++j) vstore(sT + q * mp + W * j, ex[j]), total[j] += ex[j];
    }
    bool finite = true;
    const float inv_m = 1.0f / static_cast<float>(m);
    float sums[W * N], checks[W * N], weight[W * N] = {};  // padding lanes: weight 0
    std::memcpy(sums, total, sizeof sums);
    std::memcpy(checks, check, sizeof checks);
    for (int l = 0; l < lanes; ++l) {
        finite &= std::isfinite(checks[l]) & std::isfinite(sums[l]);
        // −log softmax(s)[y] = log Σ exp(s − top) − (s[y] − top): exact however small softmax(s)[y] is
        const float nll = std::log(sums[l]) - label_shifted[l];
        weight[l] = inv_m;  // of this example's (softmax(s) − onehot(y)) in δs
        if (offset > 0) {
            // −log(p_y + δ) with p_y = exp(log softmax(s)[y]) (0 where that underflows: the exact limit), whose
            // gradient is cross-entropy's scaled by p_y/(p_y + δ); in double, then rounded as the reference's
            const double p_y = std::exp(-static_cast<double>(nll));
            loss += -std::log(p_y + offset);
            weight[l] = static_cast<float>(inv_m * (p_y / (p_y + offset)));
        } else {
            loss += static_cast<double>(nll);
        }
    }
    V scales[N];  // weight / Σ exp(s − top), 0 in the padding lanes
    for (int j = 0; j < N; ++j) {
        VI lane;
        for (int l = 0; l < W; ++l) lane[l] = W * j + l;
        scales[j] = lane < lanes ? vload<V>(weight + W * j) / total[j] : splat(0.0f);
    }
    for (int64_t q = 0; q < p; ++q)
        for (int j = 0; j < N; ++j) vstore(sT + q * mp + W * j, vload<V>(sT + q * mp + W * j) * scales[j]);
    for (int l = 0; l < lanes; ++l) sT[k.y[i0 + l] * mp + l] -= weight[l];
    return finite;
}

// N vectors of z + bias → GELU in place (uT) and GELU′ into slope. The GELU pass runs four v16 (64 lanes) at a
// time with AVX-512 (as eight v8 in AVX-512's 32 registers, which were 20% faster than four; v16: ~25% less
// again on Zen 4), four v8 with AVX2's 16 (eight: 4% slower), then single ones.
template <int N, typename V = v8>
inline void gelu_vectors(float* z, float* slope, float bias) {
    constexpr int W = lanes_of<V>();
    V zz[N], value[N], derivative[N];
    for (int j = 0; j < N; ++j) zz[j] = vload<V>(z + W * j) + vsplat<V>(bias);
    gelun<N>(zz, value, derivative);
    for (int j = 0; j < N; ++j) vstore(z + W * j, value[j]), vstore(slope + W * j, derivative[j]);
}

// offset δ > 0: the chain loss is the study's −mean log(softmax(s)_y + δ) instead of cross-entropy (δ = 0).
// L_m(w) of one minibatch (NaN when any logit is not finite) and ∇L_m(w) into k.grad.
double loss_and_gradient(const Shape& S, const float* w, Scratch& k, double offset) {
    const int64_t p = S.p, e = S.e, h = S.h, m = S.m, mp = k.mp, ep = k.ep, hp = k.hp;
    float* sT = k.sT.data();
    const float* E = w + S.oE;
    const float* L = w + S.oL;
    const float* R = w + S.oR;
    const float* U = w + S.oU;

    // the minibatch's embeddings: EE [mp, 2ep] = rows [E[a_i] E[b_i]], ET [2ep, mp] = EEᵀ (examples as lanes)
    for (int64_t i = 0; i < m; ++i) {
        copy_row(k.EE.data() + i * 2 * ep, E + k.a[i] * e, e);
        copy_row(k.EE.data() + i * 2 * ep + ep, E + k.b[i] * e, e);
    }
    transpose(mp, 2 * ep, k.EE.data(), 2 * ep, k.ET.data(), mp);
    for (int64_t c = 0; c < h; ++c) {  // LR [h, 2ep] = [L R]
        copy_row(k.LR.data() + c * 2 * ep, L + c * e, e);
        copy_row(k.LR.data() + c * 2 * ep + ep, R + c * e, e);
    }

    // forward: zT = [L R]·ET (+ b_L + b_R), u = GELU(z), logits sT = U·uT (the padding adds exact zeros)
    gemm(h, mp / 8, 2 * ep, k.LR.data(), 2 * ep, 1, k.ET.data(), mp, k.zT.data(), mp);
    for (int64_t c = 0; c < h; ++c) {
        const float bias = w[S.obL + c] + w[S.obR + c];
        float* z = k.zT.data() + c * mp;
        float* gg = k.gT.data() + c * mp;
        int64_t i = 0;
#if defined(FASTLLC_V16)
        for (; i + 64 <= mp; i += 64) gelu_vectors<4, v16>(z + i, gg + i, bias);
#endif
        for (; i + 32 <= mp; i += 32) gelu_vectors<4>(z + i, gg + i, bias);
        for (; i < mp; i += 8) gelu_vectors<1>(z + i, gg + i, bias);
    }
    const float* uT = k.zT.data();
    gemm(p, mp / 8, h, U, h, 1, uT, mp, sT, mp);

    // the loss, and δs = w_i·(softmax(s_i) − onehot(y_i)) over the logits, 32 examples at a time (as fast as 16
    // with AVX2, 12% faster with AVX-512's registers; 64: slower; with AVX-512 as two v16, as fast as four v8 on
    // Zen 4, half the instructions), then 16, then 8
    double loss = 0.0;
    bool finite = true;
    int64_t i0 = 0;
#if defined(FASTLLC_V16)
    for (; i0 + 32 <= mp; i0 += 32) finite &= softmax_block<2, v16>(S, k, i0, offset, loss);
#endif
    for (; i0 + 32 <= mp; i0 += 32) finite &= softmax_block<4>(S, k, i0, offset, loss);
    for (; i0 + 16 <= mp; i0 += 16) finite &= softmax_block<2>(S, k, i0, offset, loss);
    for (; i0 < mp; i0 += 8) finite &= softmax_block<1>(S, k, i0, offset, loss);
    const float* dsT = sT;

    // backward. ∇U = δsᵀ·u (u: uT transposed, [mp, hp]); δzT = (Uᵀ·δsT) ⊙ GELU′(zT)
    float* g = k.grad.data();
    transpose(hp, mp, uT, mp, k.u.data(), hp);
    if (h == hp) {  // ∇U straight into its place, else through gU (whole vectors would spill into the next row)
        gemm(p, hp / 8, m, dsT, mp, 1, k.u.data(), hp, g + S.oU, h);
    } else {
        gemm(p, hp / 8, m, dsT, mp, 1, k.u.data(), hp, k.gU.data(), hp);
        for (int64_t q = 0; q < p; ++q) copy_row(g + S.oU + q * h, k.gU.data() + q * hp, h);
    }
    gemm(h, mp / 8, p, U, 1, h, dsT, mp, k.dzT.data(), mp);
    for (int64_t c = 0; c < h; ++c) {
        float* dz = k.dzT.data() + c * mp;
        const float* gg = k.gT.data() + c * mp;
        v8 sum = splat(0.0f);
        for (int64_t i = 0; i < mp; i += 8) {
            const v8 d = load(dz + i) * load(gg + i);
            store(dz + i, d);
            sum += d;
        }
        g[S.obL + c] = g[S.obR + c] = sum8(sum);
    }
    // [∇L ∇R] = δzᵀ·[E[a] E[b]] (rows of EE); [∇E[a_i] ∇E[b_i]] = δz_i·[L R] (rows of dEE), added to ∇E's rows
    gemm(h, 2 * ep / 8, m, k.dzT.data(), mp, 1, k.EE.data(), 2 * ep, k.gLR.data(), 2 * ep);
    gemm(m, 2 * ep / 8, h, k.dzT.data(), 1, mp, k.LR.data(), 2 * ep, k.dEE.data(), 2 * ep);
    for (int64_t c = 0; c < h; ++c) {  // into the canonical layout
        copy_row(g + S.oL + c * e, k.gLR.data() + c * 2 * ep, e);
        copy_row(g + S.oR + c * e, k.gLR.data() + c * 2 * ep + ep, e);
    }
    float* gE = g + S.oE;
    std::memset(gE, 0, sizeof(float) * p * e);
    for (int64_t i = 0; i < m; ++i) {
        add_row(gE + k.a[i] * e, k.dEE.data() + i * 2 * ep, e);
        add_row(gE + k.b[i] * e, k.dEE.data() + i * 2 * ep + ep, e);
    }
    return finite ? loss / static_cast<double>(m) : NAN;
}

}  // namespace

extern "C" {

const char* fastllc_mlp_sgld_variant() { return FASTLLC_VARIANT; }

// The calling thread's MXCSR (x86; 0 elsewhere): for testing that a run leaves the caller's mode as it was.
unsigned fastllc_fp_mode() {
#if defined(__SSE__)
    return _mm_getcsr();
#else
    return 0;
#endif
}

// The MXCSR of each thread of an OpenMP team of ``threads`` (out [threads]; the pool's threads are reused from
// region to region, and torch's may be the same ones): for testing that a run leaves every thread's mode.
void fastllc_fp_modes(int threads, unsigned* out) {
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
    out[omp_get_thread_num()] = fastllc_fp_mode();
#else
    for (int t = 0; t < threads; ++t) out[t] = fastllc_fp_mode();
#endif
}

// Steps t0 .. t0+n_steps−1 of C chains, in place on w [C, d]; returns 0, or 1 when scratch memory could not
// be allocated. moves: null, or the restriction's mask (chain c's row at moves + c·moves_stride: stride 0 when all
// chains share one [d] mask), applied to the whole increment after the projection; loss_offset: 0 for
// cross-entropy, δ > 0 for the published chain loss −mean log(p_y + δ). coefficients [C, 3] = SGLD's (decay, drift,
// noise_scale) = (εγ/2, ε·nβ/2, √ε) per chain (fastllc/sampling/samplers/sgld.py); ops [·, 2], targets [·]: the
// stacked train splits, chain c's
// examples at example_offset[c] + 0 .. n−1; direction [C, d] or null; injected_indices [C, T, m] and
// injected_noise [C, T, d] (T = total_steps) or null (then CounterRandomness's streams of chain_ids[c]);
// trace [C, T] float64; alive [C]: 1 until the chain's loss is first non-finite.
int fastllc_mlp_sgld_run(int64_t C, int64_t p, int64_t e, int64_t h, int64_t m, float* w, const float* w_star,
                         const float* direction, const uint8_t* moves, int64_t moves_stride, double loss_offset,
                         const double* coefficients, const int64_t* ops, const int64_t* targets,
                         const int64_t* example_offset, int64_t n, const int64_t* chain_ids, int64_t seed,
                         const int64_t* injected_indices, const float* injected_noise, int64_t total_steps,
                         const double* edges, const float* edges32, const float* ratios, const double* density,
                         double tail, int64_t t0, int64_t n_steps, double* trace, int32_t* alive, int threads) {
    const Shape S = make_shape(p, e, h, m);
    const Ziggurat zig{edges, edges32, ratios, density, tail};
    int failed = 0;
    const FlushDenormals caller;  // restores the calling thread's mode on return, however the region ends
#ifdef _OPENMP
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads) reduction(| : failed)
#endif
    {
        const FlushDenormals worker;  // this thread's (a pool thread keeps its MXCSR between regions)
        Scratch* scratch = nullptr;
        std::vector<int32_t> rejected;  // the noise's second pass (fill_normal)
        try {
            rejected.resize(S.d + 8);
            scratch = new Scratch(S);
        } catch (...) {
            failed = 1;
        }
        if (scratch) {
            Scratch& k = *scratch;
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
            for (int64_t c = 0; c < C; ++c) {
                if (!alive[c]) continue;
                float* wc = w + c * S.d;
                const float* star = w_star + c * S.d;
                const float* dir = direction ? direction + c * S.d : nullptr;
                const double* coefficient = coefficients + 3 * c;  // rounded to float as the Triton kernel takes them
                const float decay = static_cast<float>(coefficient[0]), drift = static_cast<float>(coefficient[1]);
                const float noise_scale = static_cast<float>(coefficient[2]);
                const int64_t offset = example_offset[c];
                for (int64_t t = t0; t < t0 + n_steps; ++t) {
                    const float* xi;
                    if (injected_indices) {
                        const int64_t* idx = injected_indices + (c * total_steps + t) * m;
                        for (int64_t i = 0; i < m; ++i) {
                            const int64_t ex = offset + idx[i];
                            k.a[i] = ops[2 * ex], k.b[i] = ops[2 * ex + 1], k.y[i] = targets[ex];
                        }
                        xi = injected_noise + (c * total_steps + t) * S.d;
                    } else {
                        const uint64_t ikey = stream_key(seed, INDEX_STREAM, chain_ids[c], t);
                        for (int64_t i = 0; i < m; ++i) {
                            const uint64_t word = mix64(ikey + GOLDEN * static_cast<uint64_t>(i));
                            const int64_t ex = offset + static_cast<int64_t>(((word >> 32) * static_cast<uint64_t>(n)) >> 32);
                            k.a[i] = ops[2 * ex], k.b[i] = ops[2 * ex + 1], k.y[i] = targets[ex];
                        }
                        const uint64_t nkey = stream_key(seed, NOISE_STREAM, chain_ids[c], t);
                        fill_normal(zig, nkey, S.d, k.noise.data(), rejected.data());
                        xi = k.noise.data();
                    }
                    const double loss = loss_and_gradient(S, wc, k, loss_offset);
                    trace[c * total_steps + t] = loss;
                    if (!std::isfinite(loss)) {
                        alive[c] = 0;
                        break;
                    }
                    const float* g = k.grad.data();
                    const uint8_t* kc = moves ? moves + c * moves_stride : nullptr;
                    // Δ_j = −decay·(w − w*)_j − drift·∇_j + noise_scale·ξ_j, rounded the same way in each branch
#define INCREMENT(j) MADD(noise_scale, xi[j], MADD(-drift, g[j], -decay * (wc[j] - star[j])))
                    if (dir) {  // Δ −= (Δ·g)g needs the whole Δ first
                        float* inc = k.inc.data();
                        for (int64_t j = 0; j < S.d; ++j) inc[j] = INCREMENT(j);
                        double dot[8] = {};  // Δ·g in eight running sums (lanes), not one serial chain of adds
                        int64_t j = 0;
                        for (; j + 8 <= S.d; j += 8)
                            for (int l = 0; l < 8; ++l) dot[l] += static_cast<double>(inc[j + l]) * dir[j + l];
                        for (; j < S.d; ++j) dot[0] += static_cast<double>(inc[j]) * dir[j];
                        const float f = static_cast<float>(((dot[0] + dot[4]) + (dot[1] + dot[5])) +
                                                           ((dot[2] + dot[6]) + (dot[3] + dot[7])));
                        for (int64_t j = 0; j < S.d; ++j) inc[j] = MADD(-f, dir[j], inc[j]);
                        for (int64_t j = 0; j < S.d; ++j) wc[j] = !kc || kc[j] ? wc[j] + inc[j] : wc[j];
                    } else if (kc) {  // restricted: unselected weights get no increment at all (bit for bit w*)
                        for (int64_t j = 0; j < S.d; ++j) wc[j] = kc[j] ? wc[j] + INCREMENT(j) : wc[j];
                    } else {
                        for (int64_t j = 0; j < S.d; ++j) wc[j] += INCREMENT(j);
                    }
#undef INCREMENT
                }
            }
            delete scratch;
        }
    }
    return failed;
}

// The vectorised transcendentals on n values (exp: n a multiple of 16, GELU: of 32), for testing their error
// bounds.
void fastllc_exp(int64_t n, const float* x, float* out) {  // lane for lane as the softmax's expn<4>
    for (int64_t i = 0; i < n; i += 16) {
        v8 v[2] = {load(x + i), load(x + i + 8)};
        expn<2>(v);
        store(out + i, v[0]), store(out + i + 8, v[1]);
    }
}

void fastllc_gelu(int64_t n, const float* z, float* value, float* slope) {
    for (int64_t i = 0; i < n; i += 32) {  // four vectors at a time, as the kernel
        v8 x[4], v[4], s[4];
        for (int j = 0; j < 4; ++j) x[j] = load(z + i + 8 * j);
        gelun<4>(x, v, s);
        for (int j = 0; j < 4; ++j) store(value + i + 8 * j, v[j]), store(slope + i + 8 * j, s[j]);
    }
}

// Unit noise [C, d] and indices [C, m] of one step, drawn as above: for testing the streams against
// CounterRandomness.
void fastllc_draw(int64_t C, int64_t m, int64_t d, int64_t n, const int64_t* chain_ids, int64_t seed, int64_t step,
                  const double* edges, const float* edges32, const float* ratios, const double* density, double tail,
                  int64_t* indices, float* noise) {
    const Ziggurat zig{edges, edges32, ratios, density, tail};
    std::vector<int32_t> rejected(d + 8);
    for (int64_t c = 0; c < C; ++c) {
        const uint64_t ikey = stream_key(seed, INDEX_STREAM, chain_ids[c], step);
        for (int64_t i = 0; i < m; ++i) {
            const uint64_t word = mix64(ikey + GOLDEN * static_cast<uint64_t>(i));
            indices[c * m + i] = static_cast<int64_t>(((word >> 32) * static_cast<uint64_t>(n)) >> 32);
        }
        const uint64_t nkey = stream_key(seed, NOISE_STREAM, chain_ids[c], step);
        fill_normal(zig, nkey, d, noise + c * d, rejected.data());
    }
}

// Unit noise of one step in CounterRandomness.fill's blocked layout (one block per parameter: the parameter-major
// layout of the generic and transformer backends): element k of chain row r in block j = [blocks[j], blocks[j+1])
// goes to noise[C·blocks[j] + r·size_j + k − blocks[j]]. An element's words are keyed by its canonical index
// (word_of is linear in it), so each block is fill_normal from the key moved to its first element: the same values
// as the Python fill, bit for bit (tests/test_randomness.py), several times faster.
void fastllc_draw_noise(int64_t C, const int64_t* chain_ids, int64_t seed, int64_t step, const double* edges,
                        const float* edges32, const float* ratios, const double* density, double tail,
                        const int64_t* blocks, int64_t nblocks, float* noise) {
    const Ziggurat zig{edges, edges32, ratios, density, tail};
    int64_t widest = 0;
    for (int64_t j = 0; j < nblocks; ++j) widest = std::max(widest, blocks[j + 1] - blocks[j]);
    std::vector<int32_t> rejected(widest + 8);
    for (int64_t c = 0; c < C; ++c) {
        const uint64_t key = stream_key(seed, NOISE_STREAM, chain_ids[c], step);
        for (int64_t j = 0; j < nblocks; ++j) {
            const int64_t lo = blocks[j], size = blocks[j + 1] - lo;
            const uint64_t moved = key + GOLDEN * (static_cast<uint64_t>(lo) << WORDS_PER_ELEMENT_SHIFT);
            fill_normal(zig, moved, size, noise + C * lo + c * size, rejected.data());
        }
    }
}

}  // extern "C"
