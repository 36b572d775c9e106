// Fused passes of the transformer engine's GPT-2 step (fastllc/engines/gpt2_backward.py, ``Gpt2Pass``), one call
// per folded batch of chains on the calling thread (no threads of its own: the chain groups already run one per
// core). Each replaces several ATen passes over the activations with one, which is what the step spends outside
// its matrix products (docstring of fastllc/engines/transformer_cpu.py):
//
//   fastllc_tanh_gelu                  y = x·σ(2u), its slope σ + x·σ(1 − σ)·2u' (u = √(2/π)(x + 0.044715x³))
//   fastllc_layer_norm                 (x − μ)/√(var + ε) with chain c's gain and bias; μ and 1/√(var + ε) kept
//   fastllc_layer_norm_backward        ∇x (plus a residual's gradient), ∇gain and ∇bias summed over the tokens
//   fastllc_causal_attention           softmax(scale·q·kᵀ + causal mask)·v from the fused q | k | v activation
//   fastllc_causal_attention_backward  ∇q | ∇k | ∇v from ∇ of the attended values and the kept probabilities
//
// The reference for each is the torch code it replaces (torch.native_layer_norm + addcmul, baddbmm/softmax/bmm,
// TanhGELU): tests/test_transformer_cpu.py holds every output to a few float32 ulps of it, computed in
// float64. Sums run in float32 vector lanes (their order differs from ATen's), the gain's and bias's gradients in
// float64 (a sum over every token of a chain). exp is Cephes' expf polynomial (relative error ≤ 2 ulp), written for
// vectors of the build's width; a NaN input gives NaN outputs, and so does a layer-norm row whose variance overflows
// (a diverging chain is flagged, never hidden). Vector extensions and __builtin_shuffle: GCC (the default compiler).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
constexpr int W = 16;
#elif defined(__AVX2__)
constexpr int W = 8;
#else
constexpr int W = 4;
#endif
typedef float vf __attribute__((vector_size(W * 4)));
typedef int32_t vi __attribute__((vector_size(W * 4)));
typedef uint32_t vu __attribute__((vector_size(W * 4)));

namespace {

inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf splat(float x) { return vf{} + x; }
inline int64_t padded(int64_t n) { return (n + W - 1) / W * W; }

// a·b + c, fused where the build has FMA (the flags keep the compiler from contracting on its own)
inline vf madd(vf a, vf b, vf c) {
#if defined(__AVX512F__)
    return _mm512_fmadd_ps(a, b, c);
#elif defined(__FMA__)
    return _mm256_fmadd_ps(a, b, c);
#else
    return a * b + c;
#endif
}

inline vf lane_index() {
    vf v;
    for (int l = 0; l < W; ++l) v[l] = float(l);
    return v;
}
inline vf vmax(vf a, vf b) { return a > b ? a : b; }

// Horizontal sum and max by a tree of lane rotations (log₂ W shuffles, not W extractions through memory).
template <int BY> inline vf rotated(vf v) {
    vi order;
    for (int l = 0; l < W; ++l) order[l] = (l + BY) % W;
    return __builtin_shuffle(v, order);
}
inline float lane_sum(vf v) {
    if (W >= 16) v += rotated<8 % W>(v);
    if (W >= 8) v += rotated<4 % W>(v);
    v += rotated<2>(v);
    v += rotated<1>(v);
    return v[0];
}
inline float lane_max(vf v) {  // a NaN lane makes the result NaN
    const auto step = [](vf a, vf b) { return (a > b || a != a) ? a : b; };
    if (W >= 16) v = step(v, rotated<8 % W>(v));
    if (W >= 8) v = step(v, rotated<4 % W>(v));
    v = step(v, rotated<2>(v));
    v = step(v, rotated<1>(v));
    return v[0];
}

// exp(x), Cephes expf: Cody–Waite reduction by ln 2 and a degree-5 polynomial, relative error ≤ 2 ulp on
// [−87.3, 88]. Arguments are clamped to that range (exp(−87.3) ≈ 1e-38, a normal float: no subnormal ever comes
// out, which Intel CPUs compute in microcode); 2ⁿ is added to the exponent bits. NaN stays NaN.
inline vf vexp(vf x) {
    const vf nan_lanes = x;
    x = x < splat(-87.3f) ? splat(-87.3f) : x;
    x = x > splat(88.0f) ? splat(88.0f) : x;
    const vf fx = madd(x, splat(1.44269504088896341f), splat(0.5f));
    vi n = __builtin_convertvector(fx, vi);
    n = __builtin_convertvector(n, vf) > fx ? n - 1 : n;  // floor
    const vf nf = __builtin_convertvector(n, vf);
    x = madd(nf, splat(-0.693359375f), x);
    x = madd(nf, splat(2.12194440e-4f), x);
    vf y = madd(splat(1.9875691500e-4f), x, splat(1.3981999507e-3f));
    y = madd(y, x, splat(8.3334519073e-3f));
    y = madd(y, x, splat(4.1665795894e-2f));
    y = madd(y, x, splat(1.6666665459e-1f));
    y = madd(y, x, splat(5.0000001201e-1f));
    y = madd(y, x * x, x + splat(1.0f));
    y = (vf)((vu)y + ((vu)n << 23));
    return nan_lanes != nan_lanes ? nan_lanes : y;
}

// Scratch of the calling thread, grown as needed: the chain groups call from their own threads.
float* scratch(std::size_t floats) {
    thread_local std::vector<float> buffer;
    if (buffer.size() < floats) buffer.resize(floats);
    return buffer.data();
}

constexpr int R = 4;  // query rows per block: four independent accumulations in flight, each key or value load shared

// Scores of rows i0 .. i0 + R − 1 (those < T) over keys j ≤ i, scaled, masked to −inf above the diagonal, then
// their softmax: p [R, Tp], 0 beyond each row's diagonal and for rows past T.
void block_probabilities(const float* base, int64_t token, int64_t i0, int64_t T, int64_t d, int64_t Tp,
                         float scaling, const float* kt, float* p) {
    const vf lanes = lane_index(), minus_inf = splat(-std::numeric_limits<float>::infinity());
    const int64_t rows = std::min<int64_t>(R, T - i0), vectors = (i0 + rows - 1) / W + 1;
    std::fill(p, p + R * Tp, 0.0f);
    for (int64_t s = 0; s < vectors; ++s) {
        vf acc[R] = {};
        for (int64_t k = 0; k < d; ++k) {
            const vf key = load(kt + k * Tp + s * W);
            for (int r = 0; r < R; ++r)
                if (r < rows) acc[r] = madd(splat(base[(i0 + r) * token + k]), key, acc[r]);
        }
        for (int r = 0; r < rows; ++r)
            store(p + r * Tp + s * W, lanes + float(s * W) > splat(float(i0 + r)) ? minus_inf : acc[r] * scaling);
    }
    for (int r = 0; r < rows; ++r) {
        float* row = p + r * Tp;
        const int64_t own = (i0 + r) / W + 1;
        vf top = minus_inf;
        for (int64_t s = 0; s < own; ++s) top = vmax(top, load(row + s * W));
        const float m = lane_max(top);
        vf total = splat(0.0f);
        for (int64_t s = 0; s < own; ++s) {
            vf e = vexp(load(row + s * W) - m);
            e = lanes + float(s * W) > splat(float(i0 + r)) ? splat(0.0f) : e;
            store(row + s * W, e);
            total += e;
        }
        const vf sum = splat(lane_sum(total));
        for (int64_t s = 0; s < own; ++s) store(row + s * W, load(row + s * W) / sum);
        for (int64_t s = own; s < vectors; ++s) store(row + s * W, splat(0.0f));
    }
}

// o [R, dp] = p [R, Tp] · v [T, dp] over keys j < jn, NV vectors of d per row in registers.
template <int NV>
void block_values(const float* p, int64_t Tp, const float* v, int64_t dp, int64_t jn, float* o) {
    vf acc[R][NV] = {};
    for (int64_t j = 0; j < jn; ++j)
        for (int n = 0; n < NV; ++n) {
            const vf value = load(v + j * dp + n * W);
            for (int r = 0; r < R; ++r) acc[r][n] = madd(splat(p[r * Tp + j]), value, acc[r][n]);
        }
    for (int r = 0; r < R; ++r)
        for (int n = 0; n < NV; ++n) store(o + r * dp + n * W, acc[r][n]);
}

// Any d: the same sums through memory, one vector of d at a time.
void block_values_any(const float* p, int64_t Tp, const float* v, int64_t dp, int64_t jn, float* o) {
    for (int64_t n = 0; n < dp; n += W) {
        vf acc[R] = {};
        for (int64_t j = 0; j < jn; ++j) {
            const vf value = load(v + j * dp + n);
            for (int r = 0; r < R; ++r) acc[r] = madd(splat(p[r * Tp + j]), value, acc[r]);
        }
        for (int r = 0; r < R; ++r) store(o + r * dp + n, acc[r]);
    }
}

}  // namespace

extern "C" {

// y = GELU_tanh(x) and its slope, n floats (any n). σ(z) = 1/(1 + e^(−z)), exactly 0 from −z > 87 (torch's sigmoid
// gives 0 once e^(−z) overflows, from 88.7; cut at 87, σ ≥ 1.6e-38 stays a normal float, never a subnormal).
void fastllc_tanh_gelu(int64_t n, const float* x, float* y, float* slope) {
    const float c = 0.7978845608028654f, a = 0.044715f;
    const vf two_c = splat(2 * c), cubic = splat(2 * c * a), cubic_slope = splat(6 * c * a);
    float tail_in[W] = {}, tail_y[W], tail_slope[W];
    for (int64_t i = 0; i < n; i += W) {
        const bool whole = i + W <= n;
        if (!whole) std::memcpy(tail_in, x + i, (n - i) * sizeof(float));
        const vf v = load(whole ? x + i : tail_in), square = v * v;
        const vf z = madd(cubic, square, two_c) * v;  // 2u
        const vf minus = -z;
        const vf s = minus > splat(87.0f) ? splat(0.0f) : splat(1.0f) / (splat(1.0f) + vexp(minus));
        const vf value = s * v;
        const vf d = madd(value - value * s, madd(cubic_slope, square, two_c), s);  // σ + x·σ(1 − σ)·2u'
        if (whole) {
            store(y + i, value);
            store(slope + i, d);
        } else {
            store(tail_y, value);
            store(tail_slope, d);
            std::memcpy(y + i, tail_y, (n - i) * sizeof(float));
            std::memcpy(slope + i, tail_slope, (n - i) * sizeof(float));
        }
    }
}

// LayerNorm of x [C, N, D] over D with chain c's gain and bias [C, D]: out [C, N, D], mean and rstd [C, N].
// Two passes over each row (the mean, then the centred squares), as torch's CPU kernel.
void fastllc_layer_norm(int64_t C, int64_t N, int64_t D, const float* x, const float* gain, const float* bias,
                        float eps, float* out, float* mean, float* rstd) {
    const int64_t Dp = padded(D);
    float* row = scratch(Dp);
    for (int64_t c = 0; c < C; ++c) {
        const float* g = gain + c * D;
        const float* b = bias + c * D;
        for (int64_t r = 0; r < N; ++r) {
            const int64_t at = (c * N + r) * D;
            std::memcpy(row, x + at, D * sizeof(float));
            std::fill(row + D, row + Dp, 0.0f);
            vf sum = splat(0.0f);
            for (int64_t k = 0; k < Dp; k += W) sum += load(row + k);
            const float mu = lane_sum(sum) / D;
            vf squares = splat(0.0f);
            for (int64_t k = 0; k < D; k += W) {
                vf centred = load(row + k) - mu;
                if (k + W > D) for (int l = D - k; l < W; ++l) centred[l] = 0.0f;
                squares = madd(centred, centred, squares);
            }
            const float variance = lane_sum(squares) / D;  // an overflowed row is NaN, not (x − μ)·0 = its bias
            const float r_std = std::isfinite(variance) ? 1.0f / std::sqrt(variance + eps)
                                                        : std::numeric_limits<float>::quiet_NaN();
            mean[c * N + r] = mu;
            rstd[c * N + r] = r_std;
            for (int64_t k = 0; k < D; ++k) out[at + k] = (x[at + k] - mu) * r_std * g[k] + b[k];
        }
    }
}

// ∇ of fastllc_layer_norm from ∇out [C, N, D]: grad_x = rstd·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂)) with ĝ = ∇out·gain,
// plus ``residual`` where given (the gradient the block's skip connection carries; may be null); grad_x may be
// grad_out itself (each row is read before it is written). ∇gain = Σ_tokens ∇out·x̂, ∇bias = Σ_tokens ∇out [C, D]:
// float32 vector partial sums over 32 rows at a time, added into float64 (a chain's N rows are many thousands).
void fastllc_layer_norm_backward(int64_t C, int64_t N, int64_t D, const float* grad_out, const float* x,
                                 const float* mean, const float* rstd, const float* gain, const float* residual,
                                 float* grad_x, float* grad_gain, float* grad_bias) {
    const int64_t Dp = padded(D);
    float* g = scratch(8 * Dp);  // gain, ∇out row, x row, x̂ row, ĝ row, ∇x row, ∇gain and ∇bias partial sums
    float *dy = g + Dp, *row = dy + Dp, *xhat = row + Dp, *scaled = xhat + Dp, *dx = scaled + Dp,
          *part_gain = dx + Dp, *part_bias = part_gain + Dp;
    std::vector<double> sum_gain(D), sum_bias(D);
    const auto flush = [&] {
        for (int64_t k = 0; k < D; ++k) {
            sum_gain[k] += part_gain[k];
            sum_bias[k] += part_bias[k];
        }
        std::fill(part_gain, part_gain + 2 * Dp, 0.0f);
    };
    for (int64_t c = 0; c < C; ++c) {
        std::fill(sum_gain.begin(), sum_gain.end(), 0.0);
        std::fill(sum_bias.begin(), sum_bias.end(), 0.0);
        // the padding lanes of gain, ∇out and x stay 0 (only D floats are copied in), so x̂'s are −μ·rstd, finite,
        // and ĝ's 0: they add nothing below, whatever the scratch held
        std::fill(g, g + 3 * Dp, 0.0f);
        std::fill(part_gain, part_gain + 2 * Dp, 0.0f);
        std::memcpy(g, gain + c * D, D * sizeof(float));
        for (int64_t r = 0; r < N; ++r) {
            const int64_t at = (c * N + r) * D;
            const vf mu = splat(mean[c * N + r]), r_std = splat(rstd[c * N + r]);
            std::memcpy(dy, grad_out + at, D * sizeof(float));
            std::memcpy(row, x + at, D * sizeof(float));
            vf sum_scaled = splat(0.0f), sum_product = splat(0.0f);
            for (int64_t k = 0; k < Dp; k += W) {
                const vf d = load(dy + k), h = (load(row + k) - mu) * r_std, sc = d * load(g + k);
                store(xhat + k, h);
                store(scaled + k, sc);
                store(part_gain + k, madd(d, h, load(part_gain + k)));
                store(part_bias + k, load(part_bias + k) + d);
                sum_scaled += sc;
                sum_product = madd(sc, h, sum_product);
            }
            const vf a = splat(lane_sum(sum_scaled) / D), b = splat(lane_sum(sum_product) / D);
            for (int64_t k = 0; k < Dp; k += W)
                store(dx + k, r_std * (load(scaled + k) - a - load(xhat + k) * b));
            if (residual)
                for (int64_t k = 0; k < D; ++k) grad_x[at + k] = dx[k] + residual[at + k];
            else
                std::memcpy(grad_x + at, dx, D * sizeof(float));
            if (r % 32 == 31) flush();
        }
        flush();
        for (int64_t k = 0; k < D; ++k) {
            grad_gain[c * D + k] = float(sum_gain[k]);
            grad_bias[c * D + k] = float(sum_bias[k]);
        }
    }
}

// Causal self-attention over B sequences of T tokens, H heads of d: ``qkv`` [B, T, 3, H, d] (GPT-2's c_attn
// output as it lies: q | k | v, heads side by side), probs [B, H, T, T] (kept for the backward; 0 above the
// diagonal), out [B, T, H, d] (heads side by side: the input of the output projection). Per (sequence, head): kᵀ
// and v copied into padded tiles, then per query row the scores over its keys j ≤ i as vectors over j, the
// softmax, and Σ_j p_j·v_j as vectors over d. The scale multiplies the finished dot product (as baddbmm's alpha).
void fastllc_causal_attention(int64_t B, int64_t T, int64_t H, int64_t d, float scaling, const float* qkv,
                              float* probs, float* out) {
    const int64_t Tp = padded(T), dp = padded(d), token = 3 * H * d;
    float* kt = scratch(d * Tp + T * dp + R * Tp + R * dp);
    float *v = kt + d * Tp, *p = v + T * dp, *o = p + R * Tp;
    const auto values = dp == W ? block_values<1> : dp == 2 * W ? block_values<2> : dp == 4 * W ? block_values<4>
                                                                                              : block_values_any;
    for (int64_t bh = 0; bh < B * H; ++bh) {
        const int64_t b = bh / H, h = bh % H;
        const float* base = qkv + b * T * token + h * d;
        std::fill(kt, kt + d * Tp, 0.0f);
        std::fill(v, v + T * dp, 0.0f);
        for (int64_t j = 0; j < T; ++j) {
            const float* key = base + j * token + H * d;
            for (int64_t k = 0; k < d; ++k) kt[k * Tp + j] = key[k];
            std::memcpy(v + j * dp, base + j * token + 2 * H * d, d * sizeof(float));
        }
        for (int64_t i0 = 0; i0 < T; i0 += R) {
            const int64_t rows = std::min<int64_t>(R, T - i0);
            block_probabilities(base, token, i0, T, d, Tp, scaling, kt, p);
            values(p, Tp, v, dp, i0 + rows, o);
            for (int64_t r = 0; r < rows; ++r) {
                std::memcpy(probs + (bh * T + i0 + r) * T, p + r * Tp, T * sizeof(float));
                std::memcpy(out + (b * T + i0 + r) * H * d + h * d, o + r * dp, d * sizeof(float));
            }
        }
    }
}

// ∇ of fastllc_causal_attention: from grad_out [B, T, H, d] and the kept probs, grad_qkv [B, T, 3, H, d] (every
// element written). Per (sequence, head), a block of R query rows at a time: ∇p_ij = ∇o_i·v_j (vectors over j, vᵀ
// tiled), the softmax's ∇s_ij = p_ij(∇p_ij − Σ_j p_ij ∇p_ij), then, one vector of d at a time, ∇q_i = scale·Σ_j ∇s_ij
// k_j, ∇k_j += Σ_i ∇s_ij q_i, ∇v_j += Σ_i p_ij ∇o_i; ∇k takes the scale when written (as torch's (∇sᵀq)·scale).
void fastllc_causal_attention_backward(int64_t B, int64_t T, int64_t H, int64_t d, float scaling, const float* qkv,
                                       const float* probs, const float* grad_out, float* grad_qkv) {
    const int64_t Tp = padded(T), dp = padded(d), token = 3 * H * d;
    float* vt = scratch(d * Tp + 5 * T * dp + 2 * R * Tp + R * dp);
    float *q = vt + d * Tp, *k = q + T * dp, *dk = k + T * dp, *dv = dk + T * dp, *dO = dv + T * dp;
    float *p = dO + T * dp, *ds = p + R * Tp, *dq = ds + R * Tp;
    for (int64_t bh = 0; bh < B * H; ++bh) {
        const int64_t b = bh / H, h = bh % H;
        const float* base = qkv + b * T * token + h * d;
        float* grad_base = grad_qkv + b * T * token + h * d;
        std::fill(vt, vt + d * Tp, 0.0f);
        std::fill(q, q + 5 * T * dp, 0.0f);  // q, k, dk, dv, dO
        for (int64_t j = 0; j < T; ++j) {
            const float* row = base + j * token;
            std::memcpy(q + j * dp, row, d * sizeof(float));
            std::memcpy(k + j * dp, row + H * d, d * sizeof(float));
            for (int64_t c = 0; c < d; ++c) vt[c * Tp + j] = row[2 * H * d + c];
            std::memcpy(dO + j * dp, grad_out + (b * T + j) * H * d + h * d, d * sizeof(float));
        }
        for (int64_t i0 = 0; i0 < T; i0 += R) {
            const int64_t rows = std::min<int64_t>(R, T - i0), jn = i0 + rows, vectors = (jn - 1) / W + 1;
            std::fill(p, p + 2 * R * Tp, 0.0f);  // p and ∇s: rows past T stay 0 and add nothing below
            for (int64_t r = 0; r < rows; ++r) std::memcpy(p + r * Tp, probs + (bh * T + i0 + r) * T, jn * sizeof(float));
            vf dot[R] = {};
            for (int64_t s = 0; s < vectors; ++s) {
                vf acc[R] = {};
                for (int64_t c = 0; c < d; ++c) {
                    const vf value = load(vt + c * Tp + s * W);
                    for (int r = 0; r < R; ++r)  // rows past T: 0, not what lies beyond the buffer
                        acc[r] = madd(splat(r < rows ? dO[(i0 + r) * dp + c] : 0.0f), value, acc[r]);
                }
                for (int r = 0; r < R; ++r) {
                    store(ds + r * Tp + s * W, acc[r]);
                    dot[r] = madd(load(p + r * Tp + s * W), acc[r], dot[r]);
                }
            }
            for (int r = 0; r < R; ++r) {
                const vf total = splat(lane_sum(dot[r]));
                for (int64_t s = 0; s < vectors; ++s)
                    store(ds + r * Tp + s * W, load(p + r * Tp + s * W) * (load(ds + r * Tp + s * W) - total));
            }
            for (int64_t n = 0; n < dp; n += W) {
                vf qi[R], oi[R], acc[R] = {};
                for (int r = 0; r < R; ++r) {  // rows past T: q and ∇o are 0 (the buffers hold T rows: clamp)
                    qi[r] = r < rows ? load(q + (i0 + r) * dp + n) : splat(0.0f);
                    oi[r] = r < rows ? load(dO + (i0 + r) * dp + n) : splat(0.0f);
                }
                for (int64_t j = 0; j < jn; ++j) {
                    const vf key = load(k + j * dp + n);
                    vf grad_key = load(dk + j * dp + n), grad_value = load(dv + j * dp + n);
                    for (int r = 0; r < R; ++r) {
                        const vf grad_score = splat(ds[r * Tp + j]);
                        acc[r] = madd(grad_score, key, acc[r]);
                        grad_key = madd(grad_score, qi[r], grad_key);
                        grad_value = madd(splat(p[r * Tp + j]), oi[r], grad_value);
                    }
                    store(dk + j * dp + n, grad_key);
                    store(dv + j * dp + n, grad_value);
                }
                for (int r = 0; r < R; ++r) store(dq + r * dp + n, acc[r]);
            }
            for (int64_t r = 0; r < rows; ++r) {
                float* gq = grad_base + (i0 + r) * token;
                for (int64_t c = 0; c < d; ++c) gq[c] = dq[r * dp + c] * scaling;
            }
        }
        for (int64_t j = 0; j < T; ++j) {
            float* row = grad_base + j * token;
            for (int64_t c = 0; c < d; ++c) row[H * d + c] = dk[j * dp + c] * scaling;
            std::memcpy(row + 2 * H * d, dv + j * dp, d * sizeof(float));
        }
    }
}

}  // extern "C"
