"""One Triton program per SGLD chain of the study's MLP, many steps per launch (a persistent kernel).

Why this shape. A chain of the published workload (p=53, e=8, h=32, m=64) has ~2.7k weights: they fit
on chip, so program c loads chain c's weights once, runs ``n_steps`` whole SGLD steps (gather, forward,
cross-entropy, hand-written backward, update, noise) with the weights held in registers, and writes
them back once; between steps only the loss L_m(w_t) leaves the chip. The chain index is the grid axis.

Layout. Weights are chain-major [C, d] fp32 in the canonical flat order of ``model.param_shapes``
(E (p,e), L (h,e), b_L (h), R (h,e), b_R (h), U (p,h)), whose offsets the launcher derives from it and passes
in (``layout_constants``); each parameter is a register tile padded to
powers of two ≥ 16 (P ≥ p, EB ≥ e, H ≥ h, M ≥ m) so that every ``tl.dot`` dimension is ≥ 16, and every
load and store is masked. Padding stays exactly zero: its gradient, noise and localisation are zero.
All products are fp32 with ``input_precision="ieee"`` (no TF32): the one-hot gathers below must copy
weights exactly, and the tests compare with the fp32 reference to ~1e-5.

One step (a_i, b_i operands, y_i label of minibatch example i; A, B, Y the one-hot [M, P] matrices):
    x_a = A·E, x_b = B·E                 (the embedding gather as a dot: no scatter needed backwards)
    z = x_a·Lᵀ + x_b·Rᵀ + b_L + b_R,  u = GELU(z) (exact erf),  s = u·Uᵀ,  L_m = mean_i (lse(s_i) − s_i[y_i])
    δs = (softmax(s) − Y)/m,  ∇U = δsᵀ·u,  δz = (δs·U) ⊙ (Φ(z) + z·φ(z))
    ∇b_L = ∇b_R = Σ_i δz_i,  ∇L = δzᵀ·x_a,  ∇R = δzᵀ·x_b,  ∇E = Aᵀ·(δz·L) + Bᵀ·(δz·R)
    Δ = −decay·(w − w*) − drift·∇L_m + noise_scale·ξ,   Δ −= (Δ·g)·g if orthogonal,   w += Δ
    (decay = εγ/2, drift = ε·nβ/2, noise_scale = √ε per chain: ``sampling/samplers/sgld.py``'s vocabulary)

Variants (compile-time flags). PUBLISHED: the chains follow the study's −log(p_y + δ) (``SGLDConfig.chain_loss``):
with p_y = exp(s_y − lse(s)) the row loss is −log(p_y + δ) and δs_i is scaled by p_y/(p_y + δ). RESTRICTED:
a per-chain mask moves [C, d] (int8) zeroes Δ where it is 0 (after the projection), so those weights stay at
w* bit for bit; g is then each chain's own masked direction (dir_ptr [C, d] instead of [S, d]).

Registers. Each step's one-hot matrices are rebuilt where needed (Aᵀ, Bᵀ for ∇E) instead of kept live,
and the orthogonal projection runs in two passes over the tiles (Δ·g first, then each Δ again, its noise
redrawn from the same counters) instead of holding six increments: measured with ``fastllc.kernels.aot``
(ptxas for sm_90, no GPU needed) this cut spills at the published shapes from ~5 KB to ~2 KB a thread.

Randomness. Drawn in the kernel by Philox-4x32-10 (``tl.philox``) keyed by the user's seed, with the
128-bit counter (element, step, chain, stream): noise element k (canonical flat index) of chain c at
step t uses counter (k, t, c, 0), minibatch slot i uses (i, t, c, 1). A value therefore depends only on
(seed, chain, step, element): not on C, the grid, tile sizes or how steps are split into launches, and
the two streams never share a counter. Gaussians by Box–Muller on two words of the block, as
``tl.randn``; indices by Lemire's multiply-shift umulhi(word, n) (bias < n/2³²). ``draws`` runs the same
generators alone, so a test can inject exactly the kernel's randomness into the reference sampler.
Tests may instead inject indices [C, T, m] and unit noise [C, T, d] (``INJECTED``).
"""

from __future__ import annotations

import math

import triton
import triton.language as tl
from triton.language.random import pair_uniform_to_normal, uint_to_uniform_float

from ..sampling.config import PUBLISHED_LOSS_OFFSET

NOISE_STREAM, INDEX_STREAM = tl.constexpr(0), tl.constexpr(1)  # the fourth counter word
OFFSET = tl.constexpr(PUBLISHED_LOSS_OFFSET)  # δ of the published chain loss


def default_num_warps(P: int, M: int) -> int:
    """8 warps once the [M, P] tiles (logits, one-hots) reach 4096 floats: at the published shapes ptxas
    (sm_90, ``fastllc.kernels.aot``) then spills ~2 KB a thread at 255 registers; 4 warps spill ~10× more.
    Not yet timed on a GPU."""
    return 8 if M * P >= 4096 else 4


def padded(size: int) -> int:
    """The tile extent for a dimension of ``size``: a power of two, at least 16 (``tl.dot``'s minimum)."""
    return max(16, triton.next_power_of_2(size))


@triton.jit
def _philox_words(seed, element, step, chain, stream: tl.constexpr):
    zero = element * 0
    return tl.philox(seed, element, zero + step, zero + chain, zero + stream)


@triton.jit
def _normal(seed, chain, step, element):
    """Unit Gaussians of noise elements ``element`` (int32 tile of canonical flat indices)."""
    w0, w1, _, _ = _philox_words(seed, element, step, chain, NOISE_STREAM)
    value, _ = pair_uniform_to_normal(uint_to_uniform_float(w0), uint_to_uniform_float(w1))
    return value


@triton.jit
def _indices(seed, chain, step, slot, n):
    """Minibatch indices in [0, n) of slots ``slot`` (int32 tile), drawn with replacement."""
    w0, _, _, _ = _philox_words(seed, slot, step, chain, INDEX_STREAM)
    return tl.umulhi(w0, (w0 * 0 + n).to(tl.uint32)).to(tl.int64)


@triton.jit
def _noise(seed, chain, step, offsets, mask, row_ptr, INJECTED: tl.constexpr):
    """ξ for one parameter tile: injected (row_ptr: this chain-step's [d] row) or drawn; 0 on padding."""
    if INJECTED:
        xi = tl.load(row_ptr + offsets, mask=mask, other=0.0)
    else:
        xi = tl.where(mask, _normal(seed, chain, step, offsets), 0.0)
    return xi


@triton.jit
def _delta(x, grad, offsets, mask, star_row, noise_row, seed, chain, step, decay, drift, noise_scale,
           INJECTED: tl.constexpr):
    """Δ = −decay·(x − x*) − drift·∇ + noise_scale·ξ of one tile, with decay = εγ/2, drift = ε·nβ/2,
    noise_scale = √ε (``sampling/samplers/sgld.py``'s vocabulary; x* re-read: it stays in cache)."""
    x_star = tl.load(star_row + offsets, mask=mask, other=0.0)
    return (-(decay * (x - x_star) + drift * grad)
            + noise_scale * _noise(seed, chain, step, offsets, mask, noise_row, INJECTED))


@triton.jit
def _along(x, grad, offsets, mask, star_row, dir_row, noise_row, seed, chain, step, decay, drift, noise_scale,
           INJECTED: tl.constexpr):
    """This tile's share of Δ·g."""
    g = tl.load(dir_row + offsets, mask=mask, other=0.0)
    delta = _delta(x, grad, offsets, mask, star_row, noise_row, seed, chain, step, decay, drift, noise_scale, INJECTED)
    return tl.sum(delta * g)


@triton.jit
def _apply(x, grad, offsets, mask, star_row, dir_row, moves_row, noise_row, seed, chain, step, decay, drift, noise_scale,
           along, INJECTED: tl.constexpr, ORTHOGONAL: tl.constexpr, RESTRICTED: tl.constexpr):
    """x + Δ, or x + Δ − (Δ·g)·g with ``along`` = Δ·g; the increment zeroed where moves is 0 (RESTRICTED)."""
    delta = _delta(x, grad, offsets, mask, star_row, noise_row, seed, chain, step, decay, drift, noise_scale, INJECTED)
    if ORTHOGONAL:
        delta -= along * tl.load(dir_row + offsets, mask=mask, other=0.0)
    if RESTRICTED:
        delta = tl.where(tl.load(moves_row + offsets, mask=mask, other=0) != 0, delta, 0.0)
    return x + delta


@triton.jit(do_not_specialize=["seed", "t0", "n_steps"])  # a 1 there would otherwise compile a second kernel
def _sgld_kernel(w_ptr,  # [C, d] fp32, chain-major weights, canonical order: updated in place
                 star_ptr,  # [S, d] fp32, w* of each start (start s = chain // chains_per_start)
                 dir_ptr,  # [S, d] fp32, unit ∇L_n(w*) of each start, [C, d] of each chain if RESTRICTED
                 #           (read only if ORTHOGONAL)
                 coefficients_ptr,  # [C, 3] fp32, per chain (decay, drift, noise_scale) = (εγ/2, ε·nβ/2, √ε)
                 ops_ptr,  # [S·n, 2] int64, operands (a, b): start s's split at rows s·n ..
                 tgt_ptr,  # [S·n] int64, labels, same rows
                 idx_ptr,  # [C, total_steps, m] int64, injected minibatch indices (read only if INJECTED)
                 noise_ptr,  # [C, total_steps, d] fp32, injected unit noise (read only if INJECTED)
                 trace_ptr,  # [C, total_steps] fp32, out: L_m(w_t) of every step run
                 moves_ptr,  # [C, d] int8, 1 where the chain moves the weight (read only if RESTRICTED)
                 seed,  # int64, keys the in-kernel Philox streams
                 n,  # examples in one start's split
                 chains_per_start,  # C / S
                 total_steps,  # T of the whole run: the row length of trace, idx and noise
                 t0, n_steps,  # this launch runs steps t0 .. t0+n_steps−1
                 p: tl.constexpr, e: tl.constexpr, h: tl.constexpr, m: tl.constexpr,  # the MLP and minibatch
                 P: tl.constexpr, EB: tl.constexpr, H: tl.constexpr, M: tl.constexpr,  # their tiles (``padded``)
                 OFF_L: tl.constexpr, OFF_BL: tl.constexpr, OFF_R: tl.constexpr, OFF_BR: tl.constexpr,  # the layout
                 OFF_U: tl.constexpr, D: tl.constexpr,  # (``layout_constants``: from ``model.param_shapes``)
                 INJECTED: tl.constexpr, ORTHOGONAL: tl.constexpr, PUBLISHED: tl.constexpr,
                 RESTRICTED: tl.constexpr):
    """Steps t0 .. t0+n_steps−1 of chain ``program_id(0)``; see the module docstring."""
    chain = tl.program_id(0)
    row = chain.to(tl.int64)
    start = (chain // chains_per_start).to(tl.int64)
    rP, rE, rH, rM = tl.arange(0, P), tl.arange(0, EB), tl.arange(0, H), tl.arange(0, M)
    p_ok, e_ok, h_ok, m_ok = rP < p, rE < e, rH < h, rM < m
    oE, mE = rP[:, None] * e + rE[None, :], p_ok[:, None] & e_ok[None, :]
    oL, mL = OFF_L + rH[:, None] * e + rE[None, :], h_ok[:, None] & e_ok[None, :]
    oR = OFF_R + rH[:, None] * e + rE[None, :]
    oBL, oBR = OFF_BL + rH, OFF_BR + rH
    oU, mU = OFF_U + rP[:, None] * h + rH[None, :], p_ok[:, None] & h_ok[None, :]

    w_row, star_row, moves_row = w_ptr + row * D, star_ptr + start * D, moves_ptr + row * D
    if RESTRICTED:  # each chain projects on its own masked direction
        dir_row = dir_ptr + row * D
    else:
        dir_row = dir_ptr + start * D
    E = tl.load(w_row + oE, mask=mE, other=0.0)
    L = tl.load(w_row + oL, mask=mL, other=0.0)
    bL = tl.load(w_row + oBL, mask=h_ok, other=0.0)
    R = tl.load(w_row + oR, mask=mL, other=0.0)
    bR = tl.load(w_row + oBR, mask=h_ok, other=0.0)
    U = tl.load(w_row + oU, mask=mU, other=0.0)
    decay = tl.load(coefficients_ptr + row * 3)
    drift = tl.load(coefficients_ptr + row * 3 + 1)
    noise_scale = tl.load(coefficients_ptr + row * 3 + 2)

    for t in range(n_steps):
        step = t0 + t
        # the minibatch, as one-hot matrices: gathers and scatter-adds become dots
        if INJECTED:
            ids = tl.load(idx_ptr + (row * total_steps + step) * m + rM, mask=m_ok, other=0)
        else:
            ids = _indices(seed, chain, step, rM, n)
        example = start * n + ids
        op_a = tl.load(ops_ptr + 2 * example, mask=m_ok, other=0)
        op_b = tl.load(ops_ptr + 2 * example + 1, mask=m_ok, other=0)
        label = tl.load(tgt_ptr + example, mask=m_ok, other=0)
        A = ((op_a[:, None] == rP[None, :]) & m_ok[:, None]).to(tl.float32)
        B = ((op_b[:, None] == rP[None, :]) & m_ok[:, None]).to(tl.float32)
        Y = (label[:, None] == rP[None, :]) & m_ok[:, None]

        # forward and loss
        xa = tl.dot(A, E, input_precision="ieee")
        xb = tl.dot(B, E, input_precision="ieee")
        z = (tl.dot(xa, tl.trans(L), input_precision="ieee") + tl.dot(xb, tl.trans(R), input_precision="ieee")
             + (bL + bR)[None, :])
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        u = z * cdf
        s = tl.where(p_ok[None, :], tl.dot(u, tl.trans(U), input_precision="ieee"), float("-inf"))
        s_max = tl.max(s, axis=1)
        expo = tl.exp(s - s_max[:, None])
        total = tl.sum(expo, axis=1)
        row_loss = s_max + tl.log(total) - tl.sum(tl.where(Y, s, 0.0), axis=1)  # −log p_y
        if PUBLISHED:  # −log(p_y + δ); its logit gradient is cross-entropy's times p_y/(p_y + δ)
            p_y = tl.exp(-row_loss)
            row_loss = -tl.log(p_y + OFFSET)
            row_weight = p_y / (p_y + OFFSET)
        loss = tl.sum(tl.where(m_ok, row_loss, 0.0), axis=0) / m
        tl.store(trace_ptr + row * total_steps + step, loss)

        # backward
        ds = tl.where(m_ok[:, None] & p_ok[None, :], expo / total[:, None] - Y.to(tl.float32), 0.0) / m
        if PUBLISHED:
            ds = ds * row_weight[:, None]
        gU = tl.dot(tl.trans(ds), u, input_precision="ieee")
        dz = tl.dot(ds, U, input_precision="ieee") * (cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327)
        gB = tl.sum(dz, axis=0)
        dzT = tl.trans(dz)
        gL = tl.dot(dzT, xa, input_precision="ieee")
        gR = tl.dot(dzT, xb, input_precision="ieee")
        # Aᵀ and Bᵀ built afresh from the operands rather than kept live from the forward pass
        At = ((rP[:, None] == op_a[None, :]) & m_ok[None, :]).to(tl.float32)
        Bt = ((rP[:, None] == op_b[None, :]) & m_ok[None, :]).to(tl.float32)
        gE = (tl.dot(At, tl.dot(dz, L, input_precision="ieee"), input_precision="ieee")
              + tl.dot(Bt, tl.dot(dz, R, input_precision="ieee"), input_precision="ieee"))

        # the SGLD increment of every parameter tile, projected, applied
        noise_row = noise_ptr + (row * total_steps + step) * D
        if ORTHOGONAL:  # Δ −= (Δ·g)·g: a dot product over all d parameters first, then each Δ again (noise
            # redrawn from its counters or re-read): fewer live tiles than keeping six increments in registers
            along = (_along(E, gE, oE, mE, star_row, dir_row, noise_row, seed, chain, step,
                            decay, drift, noise_scale, INJECTED)
                     + _along(L, gL, oL, mL, star_row, dir_row, noise_row, seed, chain, step,
                              decay, drift, noise_scale, INJECTED)
                     + _along(bL, gB, oBL, h_ok, star_row, dir_row, noise_row, seed, chain, step,
                              decay, drift, noise_scale, INJECTED)
                     + _along(R, gR, oR, mL, star_row, dir_row, noise_row, seed, chain, step,
                              decay, drift, noise_scale, INJECTED)
                     + _along(bR, gB, oBR, h_ok, star_row, dir_row, noise_row, seed, chain, step,
                              decay, drift, noise_scale, INJECTED)
                     + _along(U, gU, oU, mU, star_row, dir_row, noise_row, seed, chain, step,
                              decay, drift, noise_scale, INJECTED))
        else:
            along = 0.0
        E = _apply(E, gE, oE, mE, star_row, dir_row, moves_row, noise_row, seed, chain, step,
                   decay, drift, noise_scale, along, INJECTED, ORTHOGONAL, RESTRICTED)
        L = _apply(L, gL, oL, mL, star_row, dir_row, moves_row, noise_row, seed, chain, step,
                   decay, drift, noise_scale, along, INJECTED, ORTHOGONAL, RESTRICTED)
        bL = _apply(bL, gB, oBL, h_ok, star_row, dir_row, moves_row, noise_row, seed, chain, step,
                    decay, drift, noise_scale, along, INJECTED, ORTHOGONAL, RESTRICTED)
        R = _apply(R, gR, oR, mL, star_row, dir_row, moves_row, noise_row, seed, chain, step,
                   decay, drift, noise_scale, along, INJECTED, ORTHOGONAL, RESTRICTED)
        bR = _apply(bR, gB, oBR, h_ok, star_row, dir_row, moves_row, noise_row, seed, chain, step,
                    decay, drift, noise_scale, along, INJECTED, ORTHOGONAL, RESTRICTED)
        U = _apply(U, gU, oU, mU, star_row, dir_row, moves_row, noise_row, seed, chain, step,
                   decay, drift, noise_scale, along, INJECTED, ORTHOGONAL, RESTRICTED)

    tl.store(w_row + oE, E, mask=mE)
    tl.store(w_row + oL, L, mask=mL)
    tl.store(w_row + oBL, bL, mask=h_ok)
    tl.store(w_row + oR, R, mask=mL)
    tl.store(w_row + oBR, bR, mask=h_ok)
    tl.store(w_row + oU, U, mask=mU)


@triton.jit
def _draws_kernel(idx_ptr, noise_ptr, seed, first_chain, chains, steps, n, m, d, BLOCK: tl.constexpr):
    """The kernel's own indices [C, T, m] and unit noise [C, T, d], alone (tests; injection into the reference).
    One program per (chain, step) on grid axis 0 (axes 1 and 2 are limited to 65,535 on CUDA)."""
    pid = tl.program_id(0).to(tl.int64)
    local, step = pid % chains, pid // chains
    chain = (first_chain + local).to(tl.int32)
    row = local * steps + step
    step = step.to(tl.int32)
    offsets = tl.arange(0, BLOCK)
    for lo in range(0, m, BLOCK):
        slot = lo + offsets
        tl.store(idx_ptr + row * m + slot, _indices(seed, chain, step, slot, n), mask=slot < m)
    for lo in range(0, d, BLOCK):
        element = lo + offsets
        tl.store(noise_ptr + row * d + element, _normal(seed, chain, step, element), mask=element < d)


INTERPRETED = not isinstance(_sgld_kernel, triton.runtime.JITFunction)  # TRITON_INTERPRET=1 at definition
if INTERPRETED and isinstance(tl.philox, triton.runtime.JITFunction):  # Triton's own helpers: compiled kind
    raise ImportError("TRITON_INTERPRET=1 was set after Triton was imported; set it before importing Triton")


def layout_constants(p: int, e: int, h: int) -> dict[str, int]:
    """Where each parameter starts in a chain's flat weights, and d: derived from ``model.param_shapes``, the one
    definition of the layout, for the kernel's OFF_* arguments (E starts at 0)."""
    from ..model import param_shapes
    shapes = param_shapes(p, e, h)
    names = {"embed.weight": None, "left.weight": "OFF_L", "left.bias": "OFF_BL", "right.weight": "OFF_R",
             "right.bias": "OFF_BR", "unembed.weight": "OFF_U"}
    if list(shapes) != list(names):  # the kernel's tiles follow this order
        raise RuntimeError(f"the Triton kernel expects parameters {list(names)}, model.param_shapes has {list(shapes)}")
    constants, offset = {}, 0
    for name, shape in shapes.items():
        if names[name]:
            constants[names[name]] = offset
        offset += math.prod(shape)
    return {**constants, "D": offset}


def run_chains(w, w_star, direction, coefficients, operands, targets, trace, *, arch, batch_size, n, chains_per_start,
               seed, t0, n_steps, injected=None, num_warps=None, published=False, moves=None):
    """Advance every chain of ``w`` [C, d] by steps t0 .. t0+n_steps−1 in one launch, in place.

    ``direction`` None: no orthogonal restriction; else [S, d] (one row per start), or [C, d] (one per chain)
    when ``moves`` is given. ``injected``: (indices [C, T, m] int64, noise [C, T, d]). ``published``: follow
    −log(p_y + δ). ``moves``: [C, d] int8, the weights each chain moves (the others stay at w*).
    All tensors contiguous on one device (CPU only under the interpreter).
    """
    p, e, h = arch
    P, M = padded(p), padded(batch_size)
    num_warps = num_warps or default_num_warps(P, M)
    idx, noise = injected if injected is not None else (targets, w)  # never read unless INJECTED
    _sgld_kernel[(w.shape[0],)](
        w, w_star, w_star if direction is None else direction, coefficients, operands, targets, idx, noise, trace,
        w if moves is None else moves,  # never read unless RESTRICTED
        seed, n, chains_per_start, trace.shape[1], t0, n_steps,
        p=p, e=e, h=h, m=batch_size, P=P, EB=padded(e), H=padded(h), M=M, **layout_constants(p, e, h),
        INJECTED=injected is not None, ORTHOGONAL=direction is not None, PUBLISHED=bool(published),
        RESTRICTED=moves is not None, num_warps=num_warps)


def draws(seed: int, chains, steps: int, n: int, batch_size: int, dim: int, device="cpu", block: int = 256):
    """(indices [len(chains), steps, m] int64, unit noise [len(chains), steps, d] fp32) exactly as the kernel
    draws them for the consecutive global chains ``chains`` (a range)."""
    import torch

    chains = range(chains) if isinstance(chains, int) else chains
    if chains.step != 1:
        raise ValueError("draws takes a range of consecutive chains")
    idx = torch.empty(len(chains), steps, batch_size, dtype=torch.int64, device=device)
    noise = torch.empty(len(chains), steps, dim, dtype=torch.float32, device=device)
    _draws_kernel[(len(chains) * steps,)](idx, noise, seed, chains.start, len(chains), steps, n, batch_size, dim,
                                          BLOCK=block)
    return idx, noise
