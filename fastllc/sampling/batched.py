"""Backend ``torch``: every chain of the study's MLP in one set of tensors, with a hand-written backward.

All C chains' weights live in one chain-major buffer W [C, d] (canonical parameter order, see
``model.param_shapes``); each parameter is a strided view [C, *shape] of it. One step for all chains:

forward (one-hot inputs never need a matmul; DESIGN.md, "the key algebraic saving")
    T_a = E·Lᵀ + b_L,  T_b = E·Rᵀ + b_R                 [C, p, h]   per-chain tables
    z   = T_a[a] + T_b[b],  u = GELU(z)                  [C, m, h]
    s   = u·Uᵀ,  L_m = mean_i −log softmax(s_i)[y_i]     [C, m, p], [C]
backward (scaled by k_c = −(ε_c/2)·nβ_c, so G = −(ε/2)·nβ·∇L_m directly)
    δs  = k/m·(softmax(s) − onehot(y))
    ∇U  = δsᵀ·u,  δu = δs·U,  δz = δu ⊙ GELU′(z)
    δT_a = scatter-add of δz at rows a (δT_b at rows b)   ∇b_L = ∇b_R = Σ_i δz_i
    ∇L  = δT_aᵀ·E,  ∇R = δT_bᵀ·E,  ∇E = δT_a·L + δT_b·R
update (in place, preallocated buffers; a = −εγ/2, aW* precomputed)
    Δ = a·W − a·W* + G + √ε·ξ,  Δ −= (Δ·g)g if orthogonal,  W += Δ

Several starting points (checkpoints or seeds of one architecture, each with its own train split of
equal size) run as one batch: ``sample_starts``. Chain j of start s is global chain s·C + j, and its
randomness is keyed by that global index.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import FastLLCError
from ..model import ModularMLP, param_shapes
from .config import SGLDConfig
from .contract import Samples, flat_parameters, loss_and_gradient_at_start, orthogonal_direction
from .randomness import CounterRandomness, InjectedRandomness

_gelu_backward = torch.ops.aten.gelu_backward


@dataclass
class Start:
    """A starting point w*: a trained ModularMLP and the train split it is measured on."""

    model: ModularMLP
    pairs: torch.Tensor  # [n, 2] int64
    labels: torch.Tensor  # [n] int64


def is_cross_entropy(loss_fn) -> bool:
    if loss_fn is F.cross_entropy:
        return True
    return (isinstance(loss_fn, torch.nn.CrossEntropyLoss) and loss_fn.reduction == "mean"
            and loss_fn.weight is None and loss_fn.label_smoothing == 0.0)


def supports(model, loss_fn) -> bool:
    """Whether this backend can run ``model`` with ``loss_fn`` (the study's MLP with cross-entropy)."""
    return isinstance(model, ModularMLP) and is_cross_entropy(loss_fn)


class ChainBatch:
    """Weights, gradients and work buffers of C chains of one architecture, and the fused step."""

    def __init__(self, p: int, embed: int, hidden: int, w_star: torch.Tensor, batch_size: int):
        self.p, self.e, self.h, self.m = p, embed, hidden, batch_size
        self.C, self.d = w_star.shape
        device = w_star.device
        self.w_star = w_star
        self.W = w_star.clone()
        self.G = torch.empty_like(w_star)
        self.param, self.grad = self._views(self.W), self._views(self.G)
        C, m, h = self.C, self.m, self.h
        self.T_a = torch.empty(C * p, h, device=device)
        self.T_b = torch.empty(C * p, h, device=device)
        self.dT_a = torch.empty(C * p, h, device=device)
        self.dT_b = torch.empty(C * p, h, device=device)
        self.z = torch.empty(C * m, h, device=device)
        self.row_offset = (torch.arange(C, device=device) * p).unsqueeze(1)  # chain c's table rows start at c·p
        self.minus_one = torch.full((C, batch_size, 1), -1.0, device=device)

    def _views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        views, offset = {}, 0
        for name, shape in param_shapes(self.p, self.e, self.h).items():
            size = math.prod(shape)
            views[name] = flat[:, offset : offset + size].view(self.C, *shape)
            offset += size
        return views

    def loss_and_scaled_grad(self, a: torch.Tensor, b: torch.Tensor, y: torch.Tensor,
                             scale: torch.Tensor) -> torch.Tensor:
        """L_m per chain [C]; writes scale_c·∇L_m into G. a, b, y: [C, m] int64; scale: [C, 1, 1]."""
        C, m, p, h = self.C, self.m, self.p, self.h
        # The weight matrices are strided views of W; batched matmuls on CPU take a slow per-matrix path
        # for strided operands and outputs, so they work on contiguous copies (≈5% of a step).
        E, U = self.param["embed.weight"].contiguous(), self.param["unembed.weight"].contiguous()
        L, R = self.param["left.weight"].contiguous(), self.param["right.weight"].contiguous()
        T_a, T_b = self.T_a.view(C, p, h), self.T_b.view(C, p, h)
        torch.baddbmm(self.param["left.bias"].unsqueeze(1), E, L.transpose(1, 2), out=T_a)
        torch.baddbmm(self.param["right.bias"].unsqueeze(1), E, R.transpose(1, 2), out=T_b)
        rows_a = (a + self.row_offset).view(-1)
        rows_b = (b + self.row_offset).view(-1)
        torch.index_select(self.T_a, 0, rows_a, out=self.z)
        z = self.z.add_(self.T_b.index_select(0, rows_b)).view(C, m, h)
        u = F.gelu(z)
        log_probs = torch.log_softmax(torch.bmm(u, U.transpose(1, 2)), dim=-1)  # [C, m, p]
        loss = log_probs.gather(-1, y.unsqueeze(-1)).mean(dim=(1, 2)).neg_()

        d_logits = log_probs.exp_()  # softmax, in place
        d_logits.scatter_add_(-1, y.unsqueeze(-1), self.minus_one)
        d_logits.mul_(scale / m)
        self.grad["unembed.weight"].copy_(torch.bmm(d_logits.transpose(1, 2), u))
        dz = _gelu_backward(torch.bmm(d_logits, U), z)  # [C, m, h]
        self.dT_a.zero_().index_add_(0, rows_a, dz.view(-1, h))
        self.dT_b.zero_().index_add_(0, rows_b, dz.view(-1, h))
        dT_a, dT_b = self.dT_a.view(C, p, h), self.dT_b.view(C, p, h)
        torch.sum(dz, dim=1, out=self.grad["left.bias"])
        self.grad["right.bias"].copy_(self.grad["left.bias"])
        self.grad["left.weight"].copy_(torch.bmm(dT_a.transpose(1, 2), E))
        self.grad["right.weight"].copy_(torch.bmm(dT_b.transpose(1, 2), E))
        self.grad["embed.weight"].copy_(torch.bmm(dT_a, L).baddbmm_(dT_b, R))
        return loss


def _per_chain_column(vector: torch.Tensor, device) -> torch.Tensor:
    return vector.to(device=device, dtype=torch.float32).unsqueeze(1)


def sample_starts(starts: list[Start], config: SGLDConfig, *, randomness=None, device="cpu",
                  progress: bool = False) -> list[Samples]:
    """Run ``config.chains`` chains from every start as one batch; one ``Samples`` per start."""
    config.validate()
    device = torch.device(device)
    first = starts[0].model
    arch = (first.p, first.embed_dim, first.hidden_dim)
    n = len(starts[0].labels)
    for start in starts:
        if (start.model.p, start.model.embed_dim, start.model.hidden_dim) != arch:
            raise FastLLCError("all starting points of one batched run must share the architecture (p, e, h)")
        if len(start.labels) != n:
            raise FastLLCError("all starting points of one batched run must have train splits of equal size")
    S, C_per, m, T = len(starts), config.chains, config.batch_size, config.steps
    C = S * C_per
    epsilon, gamma, nbeta = config.hyperparameters(n)

    setup = [loss_and_gradient_at_start(s.model, s.pairs, s.labels, F.cross_entropy) for s in starts]
    w_star = torch.stack([flat_parameters(s.model)[2] for s in starts]).repeat_interleave(C_per, 0).to(device)
    d = w_star.shape[1]
    batch = ChainBatch(*arch, w_star, m)

    eps, gam, nb = (v.repeat(S) for v in (epsilon, gamma, nbeta))
    a_coef = _per_chain_column(-eps * gam / 2, device)  # W ← (1 + a)·W − a·W* + ...
    one_plus_a, a_w_star = 1 + a_coef, w_star * a_coef
    sqrt_eps = _per_chain_column(eps.sqrt(), device)
    grad_scale = _per_chain_column(-eps / 2 * nb, device).unsqueeze(2)
    direction = None
    if config.orthogonal:
        directions = [orthogonal_direction(g) for _, g in setup]
        direction = torch.stack([g if g is not None else torch.zeros(d) for g in directions])
        direction = direction.repeat_interleave(C_per, 0).to(device)
        increment = torch.empty_like(w_star)

    pairs = torch.stack([s.pairs for s in starts]).to(device)  # [S, n, 2]
    operand_a = pairs[..., 0].reshape(-1)
    operand_b = pairs[..., 1].reshape(-1)
    targets = torch.stack([s.labels for s in starts]).to(device).reshape(-1)
    example_offset = (torch.arange(C, device=device) // C_per * n).unsqueeze(1)  # start s's split at s·n

    if randomness is None:
        randomness = CounterRandomness(config.seed, n, m, d)
    elif isinstance(randomness, InjectedRandomness):
        randomness.check(C, T, n, m, d)
    chain_ids = np.arange(C, dtype=np.int64)
    pin = device.type == "cuda"
    indices_host = torch.empty(C, m, dtype=torch.int64, pin_memory=pin)
    noise_host = torch.empty(C, d, dtype=torch.float32, pin_memory=pin)
    indices_np, noise_np = indices_host.numpy(), noise_host.numpy()
    noise = noise_host if device.type == "cpu" else torch.empty(C, d, device=device)
    trace = torch.empty(T, C, device=device)

    bar = tqdm(total=C * T, desc=f"SGLD (torch, {C} chains)", disable=not progress, leave=False, unit_scale=True)
    report_every = max(1, T // 100)
    start_time = time.perf_counter()
    for t in range(T):
        randomness.fill(chain_ids, t, indices_np, noise_np)
        indices = indices_host.to(device, non_blocking=True)
        if noise is not noise_host:
            noise.copy_(noise_host, non_blocking=True)
        examples = (indices + example_offset).view(-1)
        trace[t] = batch.loss_and_scaled_grad(operand_a[examples].view(C, m), operand_b[examples].view(C, m),
                                              targets[examples].view(C, m), grad_scale)
        if direction is None:
            batch.W.mul_(one_plus_a).add_(batch.G).addcmul_(noise, sqrt_eps).sub_(a_w_star)
        else:
            torch.mul(batch.W, a_coef, out=increment).add_(batch.G).addcmul_(noise, sqrt_eps).sub_(a_w_star)
            increment.addcmul_(direction, torch.linalg.vecdot(increment, direction).unsqueeze(1), value=-1)
            batch.W.add_(increment)
        if (t + 1) % report_every == 0:
            bar.update(C * report_every)
    trace = trace.T.double().cpu()  # waits for the device
    seconds = time.perf_counter() - start_time
    bar.close()

    # a chain that produced a non-finite loss keeps NaN from there on, as the reference does
    bad = ~torch.isfinite(trace)
    trace[bad.cumsum(dim=1) > 0] = math.nan
    finals = batch.W.cpu()
    return [Samples(trace[s * C_per : (s + 1) * C_per].clone(), setup[s][0], epsilon, gamma, nbeta, "torch",
                    str(device), seconds, finals[s * C_per : (s + 1) * C_per].clone(), chains_in_batch=C)
            for s in range(S)]


def sample(model, inputs, targets, loss_fn, config: SGLDConfig, *, randomness=None, device="cpu",
           progress: bool = False) -> Samples:
    if not supports(model, loss_fn):
        raise FastLLCError("the torch backend runs the study's ModularMLP with cross-entropy; "
                           "use --backend reference for other models or losses")
    model = model.cpu()
    return sample_starts([Start(model, inputs.cpu(), targets.cpu())], config, randomness=randomness,
                         device=device, progress=progress)[0]
