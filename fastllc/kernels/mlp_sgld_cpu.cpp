// SGLD chains of the study's MLP on the CPU: the whole step fused, one chain per OpenMP thread at a time,
// all of a chain's steps in a row with its weights and scratch in cache (backend ``native``,
// fastllc/backends/native.py, which compiles this file on first use: fastllc/native_build.py).
//
// Plain C++17, no PyTorch headers; called through ctypes on contiguous float32/float64/int64 buffers.
// The same source is compiled twice: a portable build (baseline x86-64 / any CPU, "scalar") and one with
// -mavx2 -mfma ("vector", the compiler vectorises the loops below, whose inner dimension is always the
// contiguous one). Both build with -ffp-contract=off, so that the random streams below round exactly as
// Numba's (fastllc/sampling/randomness.py); the hot loops ask for fused multiply-adds explicitly (MADD).
//
// One step of chain c (canonical parameter order of fastllc/model.py: E [p,e], L [h,e], b_L [h],
// R [h,e], b_R [h], U [p,h]; the chain's weights w [d] are contiguous):
//   z_i = L E[a_i] + R E[b_i] + b_L + b_R,  u = GELU(z) (exact erf),  s_i = U u_i
//   L_m = mean_i (logsumexp(s_i) − s_i[y_i])          (never the log of an underflowed probability)
//   δs = (softmax(s) − onehot(y)) / m, the hand-written backward to ∇L_m,
//   Δ = −(εγ/2)(w − w*) − (ε·nβ/2)∇L_m + √ε ξ,  Δ −= (Δ·g)g (orthogonal),  w += Δ
// with L_m recorded at w_t before each update; at the first non-finite loss the chain stops (its trace
// stays NaN from there, its weights are those at which the loss blew up: as the reference).
//
// Randomness: either injected (indices [C, T, m] and unit noise [C, T, d], for tests), or drawn here
// exactly as CounterRandomness draws it: SplitMix64 words keyed by (seed, stream, chain, step), Lemire's
// multiply-shift for indices, Doornik's 256-layer ziggurat (tables passed in from Python) for the noise.
// Transcendentals are the C library's (erff, expf, logf; exp and log in double for the ziggurat),
// correctly rounded to within 1–2 ulp: no approximations of our own.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__FMA__)
#define MADD(a, b, c) std::fma((a), (b), (c))
#define FASTLLC_VARIANT "vector"
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

struct Scratch {  // one thread's buffers, reused for every chain it runs
    std::vector<float> LT, RT, UT, bias, z, u, gelu_grad, s, du, dx, grad, inc, noise;
    std::vector<int64_t> a, b, y;
    explicit Scratch(const Shape& S)
        : LT(S.e * S.h), RT(S.e * S.h), UT(S.h * S.p), bias(S.h), z(S.m * S.h), u(S.m * S.h),
          gelu_grad(S.m * S.h), s(S.m * S.p), du(S.h), dx(2 * S.e), grad(S.d), inc(S.d), noise(S.d),
          a(S.m), b(S.m), y(S.m) {}
};

// L_m(w) of one minibatch and ∇L_m(w) into grad; returns the loss (float accumulation per example,
// double across examples).
double loss_and_gradient(const Shape& S, const float* w, Scratch& k) {
    const int64_t p = S.p, e = S.e, h = S.h, m = S.m;
    const float* E = w + S.oE;
    const float* L = w + S.oL;
    const float* R = w + S.oR;
    const float* U = w + S.oU;
    float* g = k.grad.data();
    std::memset(g, 0, sizeof(float) * S.d);
    float* gE = g + S.oE;
    float* gL = g + S.oL;
    float* gbL = g + S.obL;
    float* gR = g + S.oR;
    float* gbR = g + S.obR;
    float* gU = g + S.oU;

    // transposes, so that every inner loop below runs along a contiguous dimension of length h or p
    for (int64_t k2 = 0; k2 < h; ++k2)
        for (int64_t j = 0; j < e; ++j) {
            k.LT[j * h + k2] = L[k2 * e + j];
            k.RT[j * h + k2] = R[k2 * e + j];
        }
    for (int64_t q = 0; q < p; ++q)
        for (int64_t k2 = 0; k2 < h; ++k2) k.UT[k2 * p + q] = U[q * h + k2];
    for (int64_t k2 = 0; k2 < h; ++k2) k.bias[k2] = w[S.obL + k2] + w[S.obR + k2];

    const float inv_sqrt2 = 0.70710678118654752440f;
    const float inv_sqrt_2pi = 0.39894228040143267794f;
    double loss = 0.0;
    const float inv_m = 1.0f / static_cast<float>(m);
    for (int64_t i = 0; i < m; ++i) {
        float* z = k.z.data() + i * h;
        float* u = k.u.data() + i * h;
        float* gg = k.gelu_grad.data() + i * h;
        float* s = k.s.data() + i * p;
        const float* Ea = E + k.a[i] * e;
        const float* Eb = E + k.b[i] * e;
        for (int64_t k2 = 0; k2 < h; ++k2) z[k2] = k.bias[k2];
        for (int64_t j = 0; j < e; ++j) {
            const float xa = Ea[j], xb = Eb[j];
            const float* lt = k.LT.data() + j * h;
            const float* rt = k.RT.data() + j * h;
            for (int64_t k2 = 0; k2 < h; ++k2) z[k2] = MADD(xb, rt[k2], MADD(xa, lt[k2], z[k2]));
        }
        for (int64_t k2 = 0; k2 < h; ++k2) {  // GELU(z) = z·Φ(z), GELU'(z) = Φ(z) + z·φ(z)
            const float x = z[k2];
            const float cdf = 0.5f * (1.0f + std::erf(x * inv_sqrt2));
            u[k2] = x * cdf;
            gg[k2] = cdf + x * (inv_sqrt_2pi * std::exp(-0.5f * x * x));
        }
        for (int64_t q = 0; q < p; ++q) s[q] = 0.0f;
        for (int64_t k2 = 0; k2 < h; ++k2) {
            const float uk = u[k2];
            const float* ut = k.UT.data() + k2 * p;
            for (int64_t q = 0; q < p; ++q) s[q] = MADD(uk, ut[q], s[q]);
        }
        float top = s[0];
        for (int64_t q = 1; q < p; ++q) top = s[q] > top ? s[q] : top;
        float total = 0.0f;
        for (int64_t q = 0; q < p; ++q) total += std::exp(s[q] - top);
        const float lse = top + std::log(total);
        loss += static_cast<double>(lse - s[k.y[i]]);
        for (int64_t q = 0; q < p; ++q) s[q] = std::exp(s[q] - lse) * inv_m;  // δs = softmax/m ...
        s[k.y[i]] -= inv_m;                                                  // ... − onehot/m
    }
    // backward, example by example: ∇U += δs uᵀ, δu = Uᵀ δs, δz = δu ⊙ GELU′(z), then the first layer
    for (int64_t i = 0; i < m; ++i) {
        const float* u = k.u.data() + i * h;
        const float* gg = k.gelu_grad.data() + i * h;
        const float* ds = k.s.data() + i * p;
        float* du = k.du.data();
        for (int64_t k2 = 0; k2 < h; ++k2) du[k2] = 0.0f;
        for (int64_t q = 0; q < p; ++q) {
            const float dq = ds[q];
            const float* Uq = U + q * h;
            float* gUq = gU + q * h;
            for (int64_t k2 = 0; k2 < h; ++k2) {
                gUq[k2] = MADD(dq, u[k2], gUq[k2]);
                du[k2] = MADD(dq, Uq[k2], du[k2]);
            }
        }
        for (int64_t k2 = 0; k2 < h; ++k2) {
            du[k2] *= gg[k2];  // δz
            gbL[k2] += du[k2];
        }
        const int64_t ia = k.a[i], ib = k.b[i];
        const float* Ea = E + ia * e;
        const float* Eb = E + ib * e;
        float* dxa = k.dx.data();
        float* dxb = k.dx.data() + e;
        for (int64_t j = 0; j < e; ++j) dxa[j] = dxb[j] = 0.0f;
        for (int64_t k2 = 0; k2 < h; ++k2) {
            const float dz = du[k2];
            const float* Lk = L + k2 * e;
            const float* Rk = R + k2 * e;
            float* gLk = gL + k2 * e;
            float* gRk = gR + k2 * e;
            for (int64_t j = 0; j < e; ++j) {
                gLk[j] = MADD(dz, Ea[j], gLk[j]);
                gRk[j] = MADD(dz, Eb[j], gRk[j]);
                dxa[j] = MADD(dz, Lk[j], dxa[j]);
                dxb[j] = MADD(dz, Rk[j], dxb[j]);
            }
        }
        float* gEa = gE + ia * e;
        for (int64_t j = 0; j < e; ++j) gEa[j] += dxa[j];
        float* gEb = gE + ib * e;
        for (int64_t j = 0; j < e; ++j) gEb[j] += dxb[j];
    }
    for (int64_t k2 = 0; k2 < h; ++k2) gbR[k2] = gbL[k2];
    return loss / static_cast<double>(m);
}

}  // namespace

extern "C" {

const char* fastllc_mlp_sgld_variant() { return FASTLLC_VARIANT; }

// Steps t0 .. t0+n_steps−1 of C chains, in place on w [C, d]; returns 0, or 1 when scratch memory could not
// be allocated. hyper [C, 3] = (ε, γ, nβ); ops [·, 2], targets [·]: the stacked train splits, chain c's
// examples at example_offset[c] + 0 .. n−1; direction [C, d] or null; injected_indices [C, T, m] and
// injected_noise [C, T, d] (T = total_steps) or null (then CounterRandomness's streams of chain_ids[c]);
// trace [C, T] float64; alive [C]: 1 until the chain's loss is first non-finite.
int fastllc_mlp_sgld_run(int64_t C, int64_t p, int64_t e, int64_t h, int64_t m, float* w, const float* w_star,
                         const float* direction, const double* hyper, const int64_t* ops, const int64_t* targets,
                         const int64_t* example_offset, int64_t n, const int64_t* chain_ids, int64_t seed,
                         const int64_t* injected_indices, const float* injected_noise, int64_t total_steps,
                         const double* edges, const float* edges32, const float* ratios, const double* density,
                         double tail, int64_t t0, int64_t n_steps, double* trace, int32_t* alive, int threads) {
    const Shape S = make_shape(p, e, h, m);
    const Ziggurat zig{edges, edges32, ratios, density, tail};
    int failed = 0;
#ifdef _OPENMP
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads) reduction(| : failed)
#endif
    {
        Scratch* scratch = nullptr;
        try {
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
                const double eps = hyper[3 * c], gam = hyper[3 * c + 1], nb = hyper[3 * c + 2];
                const float decay = static_cast<float>(eps * gam / 2), drift = static_cast<float>(eps * nb / 2);
                const float noise_scale = static_cast<float>(std::sqrt(eps));
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
                        for (int64_t j = 0; j < S.d; ++j) k.noise[j] = normal(zig, nkey, j);
                        xi = k.noise.data();
                    }
                    const double loss = loss_and_gradient(S, wc, k);
                    trace[c * total_steps + t] = loss;
                    if (!std::isfinite(loss)) {
                        alive[c] = 0;
                        break;
                    }
                    float* inc = k.inc.data();
                    const float* g = k.grad.data();
                    for (int64_t j = 0; j < S.d; ++j)  // −decay·(w − w*) − drift·∇L_m + √ε·ξ
                        inc[j] = MADD(noise_scale, xi[j], MADD(-drift, g[j], -decay * (wc[j] - star[j])));
                    if (dir) {
                        double dot = 0.0;
                        for (int64_t j = 0; j < S.d; ++j) dot += static_cast<double>(inc[j]) * dir[j];
                        const float f = static_cast<float>(dot);
                        for (int64_t j = 0; j < S.d; ++j) inc[j] = MADD(-f, dir[j], inc[j]);
                    }
                    for (int64_t j = 0; j < S.d; ++j) wc[j] += inc[j];
                }
            }
            delete scratch;
        }
    }
    return failed;
}

// Unit noise [C, d] and indices [C, m] of one step, drawn as above: for testing the streams against
// CounterRandomness.
void fastllc_draw(int64_t C, int64_t m, int64_t d, int64_t n, const int64_t* chain_ids, int64_t seed, int64_t step,
                  const double* edges, const float* edges32, const float* ratios, const double* density, double tail,
                  int64_t* indices, float* noise) {
    const Ziggurat zig{edges, edges32, ratios, density, tail};
    for (int64_t c = 0; c < C; ++c) {
        const uint64_t ikey = stream_key(seed, INDEX_STREAM, chain_ids[c], step);
        for (int64_t i = 0; i < m; ++i) {
            const uint64_t word = mix64(ikey + GOLDEN * static_cast<uint64_t>(i));
            indices[c * m + i] = static_cast<int64_t>(((word >> 32) * static_cast<uint64_t>(n)) >> 32);
        }
        const uint64_t nkey = stream_key(seed, NOISE_STREAM, chain_ids[c], step);
        for (int64_t j = 0; j < d; ++j) noise[c * d + j] = normal(zig, nkey, j);
    }
}

}  // extern "C"
