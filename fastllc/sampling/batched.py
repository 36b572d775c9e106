"""Backend ``torch``: every chain of the study's MLP in one set of tensors, with a hand-written backward.

Layout and update: ``sgld.py`` (all chains' weights in one parameter-major buffer, canonical order of
``model.param_shapes``; the SGLD update in place over the whole buffer).

One step for all chains (a_i, b_i the operands, y_i the label of example i of the minibatch):
forward (one-hot inputs: the first layer is a row gather, never a matmul)
    x_i = [E[a_i], E[b_i]]                       [C, m, 2e]
    z   = x·[L R]ᵀ + b_L + b_R,  u = GELU(z)     [C, m, h]
    s   = u·Uᵀ,  L_m = mean_i −log softmax(s_i)[y_i]
backward, scaled by k_c = −(ε_c/2)·nβ_c so that G = −(ε/2)·nβ·∇L_m directly
    δs = k/m·(softmax(s) − onehot(y)),  ∇U = δsᵀ·u,  δz = (δs·U) ⊙ GELU′(z)
    ∇b_L = ∇b_R = Σ_i δz_i,  [∇L ∇R] = δzᵀ·x,  ∇E = scatter-add of δz·[L R] at rows a_i and b_i
update: ``sgld.sgld_update``

The gather of embedding rows is DESIGN.md's "key algebraic saving" taken per example instead of per
table: with m ≈ p both cost the same FLOPs, but this way scatters rows of width e, not h, and needs
fewer operations per step.

Several starting points (checkpoints or seeds of one architecture, each with its own train split of
equal size) run as one batch: ``sample_starts``. Chain j of start s is global chain s·C + j, and its
randomness is keyed by that global index.

On the CPU the chains run in groups, one per core, each in its own thread with single-threaded torch ops
(``threads.py``: the operations are too small for intra-op threads, which stall on a busy machine).
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
from .sgld import ParameterMajor, sgld_update
from .threads import chain_groups, min_chains_per_group, run_groups

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


def supports(model, loss_fn, device=None) -> bool:
    """Whether this backend can run ``model`` with ``loss_fn`` (the study's MLP with cross-entropy; any device)."""
    return isinstance(model, ModularMLP) and is_cross_entropy(loss_fn)


class ChainBatch(ParameterMajor):
    """Weights and gradients of C chains of one architecture (parameter-major), and the fused step."""

    def __init__(self, p: int, embed: int, hidden: int, w_star: torch.Tensor, batch_size: int):
        """``w_star``: [C, d] chain-major starting weights (canonical order)."""
        shapes = param_shapes(p, embed, hidden)
        super().__init__(shapes.values(), len(w_star))
        self.p, self.e, self.h, self.m = p, embed, hidden, batch_size
        self.W = self.to_parameter_major(w_star)
        self.G = torch.empty_like(self.W)
        self.param, self.grad = (dict(zip(shapes, self.views(flat))) for flat in (self.W, self.G))
        device = w_star.device
        self.LR = torch.empty(self.C, hidden, 2 * embed, device=device)
        self.row_offset = (torch.arange(self.C, device=device) * p).view(self.C, 1, 1)  # chain c's E rows
        self.minus_one = torch.full((self.C, batch_size, 1), -1.0, device=device)

    def loss_and_scaled_grad(self, operands: torch.Tensor, y: torch.Tensor, scale: torch.Tensor,
                             loss_sum: torch.Tensor) -> None:
        """Writes m·L_m of each chain into ``loss_sum`` [C] and k_c·∇L_m into G.

        operands [C, m, 2] and y [C, m] int64; scale [C, 1, 1] holds k_c/m (the mean's 1/m folded in).
        """
        C, m, p, e = self.C, self.m, self.p, self.e
        param, grad = self.param, self.grad
        E, U = param["embed.weight"], param["unembed.weight"]
        rows = (operands + self.row_offset).view(-1)  # [C·m·2]: rows a_i, b_i of chain c's E in E.view(C·p, e)
        x = E.view(C * p, e).index_select(0, rows).view(C, m, 2 * e)
        torch.cat((param["left.weight"], param["right.weight"]), dim=2, out=self.LR)
        bias = (param["left.bias"] + param["right.bias"]).unsqueeze(1)
        z = torch.baddbmm(bias, x, self.LR.transpose(1, 2))
        u = F.gelu(z)
        log_probs = torch.log_softmax(torch.bmm(u, U.transpose(1, 2)), dim=-1)  # [C, m, p]
        y = y.unsqueeze(-1)
        torch.sum(log_probs.gather(-1, y), dim=(1, 2), out=loss_sum)  # −m·L_m: negated and scaled once, at the end

        d_logits = log_probs.exp_()  # softmax, in place (a hand-rolled single-exp softmax measured slower)
        d_logits.scatter_add_(-1, y, self.minus_one)
        d_logits.mul_(scale)  # δs = k/m·(softmax − onehot)
        torch.bmm(d_logits.transpose(1, 2), u, out=grad["unembed.weight"])
        dz = _gelu_backward(torch.bmm(d_logits, U), z)  # [C, m, h]
        torch.sum(dz, dim=1, out=grad["left.bias"])
        grad["right.bias"].copy_(grad["left.bias"])
        d_LR = torch.bmm(dz.transpose(1, 2), x)  # [C, h, 2e]
        grad["left.weight"].copy_(d_LR[..., :e])
        grad["right.weight"].copy_(d_LR[..., e:])
        d_x = torch.bmm(dz, self.LR)  # [C, m, 2e]
        grad["embed.weight"].zero_().view(C * p, e).index_add_(0, rows, d_x.view(-1, e))


@dataclass
class _Chains:
    """Everything about a set of chains that does not change during sampling; sliceable into groups."""

    ids: np.ndarray  # [C] global chain indices: the randomness keys
    w_star: torch.Tensor  # [C, d] starting weights
    epsilon: torch.Tensor  # [C] float64
    gamma: torch.Tensor
    nbeta: torch.Tensor
    direction: torch.Tensor | None  # [C, d] unit ∇L_n(w*) of each chain's start, or None
    example_offset: torch.Tensor  # [C] where the chain's start's train split begins in operands/targets

    def group(self, lo: int, hi: int) -> "_Chains":
        return _Chains(self.ids[lo:hi], self.w_star[lo:hi], self.epsilon[lo:hi], self.gamma[lo:hi],
                       self.nbeta[lo:hi], None if self.direction is None else self.direction[lo:hi],
                       self.example_offset[lo:hi])


def _run_chains(chains: _Chains, arch, operands, targets, config: SGLDConfig, randomness, device,
                tick) -> tuple[torch.Tensor, torch.Tensor]:
    """SGLD for one group of chains: (loss trace [T, C], final weights [C, d] chain-major)."""
    C, m, T = len(chains.ids), config.batch_size, config.steps
    batch = ChainBatch(*arch, chains.w_star.to(device), m)

    a = batch.coefficient(-chains.epsilon * chains.gamma / 2, device)  # W ← (1 + a)·W − a·W* + G + √ε·ξ
    one_plus_a, sqrt_eps = 1 + a, batch.coefficient(chains.epsilon.sqrt(), device)
    a_w_star = batch.W * a
    grad_scale = (-chains.epsilon / 2 * chains.nbeta / m).to(device=device, dtype=torch.float32).view(C, 1, 1)
    projection = None
    if chains.direction is not None:
        projection = (batch.rows(batch.G), batch.rows(batch.to_parameter_major(chains.direction.to(device))))
    example_offset = chains.example_offset.to(device).unsqueeze(1)

    pin = device.type == "cuda"
    indices_host = torch.empty(C, m, dtype=torch.int64, pin_memory=pin)
    noise_host = torch.empty(C * batch.d, dtype=torch.float32, pin_memory=pin)
    indices_np, noise_np = indices_host.numpy(), noise_host.numpy()
    noise = noise_host if device.type == "cpu" else torch.empty(C * batch.d, device=device)
    trace = torch.empty(T, C, device=device)

    report_every = max(1, T // 100)
    for t in range(T):
        randomness.fill(chains.ids, t, indices_np, noise_np, batch.blocks)
        # blocking copies: the host buffers are refilled next step (untested on CUDA: no GPU here)
        indices = indices_host.to(device)
        if noise is not noise_host:
            noise.copy_(noise_host)
        examples = (indices + example_offset).view(-1)
        batch.loss_and_scaled_grad(operands.index_select(0, examples).view(C, m, 2),
                                   targets.index_select(0, examples).view(C, m), grad_scale, trace[t])
        sgld_update(batch.W, batch.G, noise, sqrt_eps, one_plus_a, a_w_star, projection)
        if (t + 1) % report_every == 0:
            tick(C * report_every)
    return trace.cpu().div_(-m), batch.to_chain_major(batch.W).cpu()


def start_points(starts: list[Start], orthogonal: bool) -> tuple[list[float], torch.Tensor, torch.Tensor | None]:
    """Per start: L_n(w*), w* and (orthogonal) the unit ∇L_n(w*) — as (losses, [S, d], [S, d] or None) on the
    CPU; a start whose gradient vanishes gets a zero direction (nothing to restrict). Each model is
    evaluated on its own device and never moved."""
    losses, gradients = [], []
    for s in starts:
        home = next(s.model.parameters()).device
        loss, gradient = loss_and_gradient_at_start(s.model, s.pairs.to(home), s.labels.to(home), F.cross_entropy)
        losses.append(loss)
        gradients.append(gradient.cpu())
    w_star = torch.stack([flat_parameters(s.model)[2].cpu() for s in starts])
    if not orthogonal:
        return losses, w_star, None
    units = [orthogonal_direction(g) for g in gradients]
    return losses, w_star, torch.stack([g if g is not None else torch.zeros(w_star.shape[1]) for g in units])


def sample_starts(starts: list[Start], config: SGLDConfig, *, randomness=None, device="cpu",
                  progress: bool = False, workers: int | None = None) -> list[Samples]:
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

    init_losses, w_star, direction = start_points(starts, config.orthogonal)
    w_star = w_star.repeat_interleave(C_per, 0)
    d = w_star.shape[1]
    if direction is not None:
        direction = direction.repeat_interleave(C_per, 0)
    chains = _Chains(np.arange(C, dtype=np.int64), w_star, epsilon.repeat(S), gamma.repeat(S), nbeta.repeat(S),
                     direction, torch.arange(C) // C_per * n)
    operands = torch.cat([s.pairs.cpu() for s in starts]).to(device)  # [S·n, 2]: start s's split at rows s·n ..
    targets = torch.cat([s.labels.cpu() for s in starts]).to(device)

    if randomness is None:
        randomness = CounterRandomness(config.seed, n, m, d)
    elif isinstance(randomness, InjectedRandomness):
        randomness.check(C, T, n, m, d)

    groups = chain_groups(C, device, min_per_group=min_chains_per_group(d), groups=workers or None)  # workers: tests
    bar = tqdm(total=C * T, desc=f"SGLD (torch, {C} chains)", disable=not progress, leave=False, unit_scale=True)
    start_time = time.perf_counter()
    results = run_groups(lambda lo, hi: _run_chains(chains.group(lo, hi), arch, operands, targets, config,
                                                    randomness, device, bar.update), groups)
    seconds = time.perf_counter() - start_time
    bar.close()

    trace = torch.cat([r[0] for r in results], dim=1).T.double()
    finals = torch.cat([r[1] for r in results])
    # a chain that produced a non-finite loss keeps NaN from there on, as the reference does
    trace[(~torch.isfinite(trace)).cumsum(dim=1) > 0] = math.nan
    return [Samples(trace[s * C_per : (s + 1) * C_per].clone(), init_losses[s], epsilon, gamma, nbeta, "torch",
                    str(device), seconds, finals[s * C_per : (s + 1) * C_per].clone(), chains_in_batch=C)
            for s in range(S)]


def sample(model, inputs, targets, loss_fn, config: SGLDConfig, *, randomness=None, device="cpu",
           progress: bool = False) -> Samples:
    if not supports(model, loss_fn):
        raise FastLLCError("the torch backend runs the study's ModularMLP with cross-entropy; "
                           "use --backend reference for other models or losses")
    return sample_starts([Start(model, inputs, targets)], config, randomness=randomness,
                         device=device, progress=progress)[0]
