"""Backend ``torch``: every chain of the study's MLP in one set of tensors, with a hand-written backward.

The forward and backward of all chains are the engine's (``fastllc/engine.py``, ``ChainBatch``); the
layout and the in-place update are ``sampling/sgld.py``'s. Several starting points (checkpoints or seeds
of one architecture, each with its own train split of equal size) run as one batch: ``sample_starts``
(``sampling/starts.py``).

On the CPU the chains run in groups, one per core, each in its own thread with single-threaded torch ops
(``sampling/threads.py``: the operations are too small for intra-op threads, which stall on a busy machine).

Beyond plain SGLD with exact cross-entropy, as the reference defines them (``backends/reference.py``):
``chain_loss="published"`` (the chains follow −log(p_y + δ): ``ChainBatch(loss_offset=δ)``), ``sampler="rmsprop_sgld"``
(``sgld.rmsprop_sgld_update`` on the same layout) and ``restrict`` (a bool mask [d] for all chains or [C, d],
one row per chain: the fixed weights are copied back from w* after every update, so they stay there bit for
bit; the orthogonal direction is each chain's ∇L_n(w*) masked by its row).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..engine import ChainBatch, is_study_mlp
from ..errors import FastLLCError
from ..sampling.config import PUBLISHED_LOSS_OFFSET, SAMPLERS, SGLDConfig
from ..sampling.contract import Samples, flat_parameters, nan_from_first_non_finite
from ..sampling.randomness import for_run
from ..sampling.restrict import start_masks
from ..sampling.sgld import RMSpropState, StepDraws, rmsprop_sgld_update, sgld_update
from ..sampling.starts import Start, check_starts, per_start, stacked_examples, start_points
from ..sampling.threads import chain_groups, min_chains_per_group, run_groups_timed

NAME = "torch"
CAPABILITIES = frozenset({"stacked_starts", "published_chain_loss", "restrict", "rmsprop_sgld"})
DEVICES = ("cpu", "cuda")
AUTO_PRIORITY = 20  # ``auto`` tries lower first: the study's MLP on CPU


def supports(model, loss_fn, device=None) -> bool:
    """The study's MLP with cross-entropy, on any device."""
    return is_study_mlp(model, loss_fn)


def require(device, model=None, loss_fn=None) -> None:
    """The one-line reason this backend cannot run ``model`` with ``loss_fn`` (when given), else nothing."""
    if model is not None and not supports(model, loss_fn, device):
        raise FastLLCError("the torch backend runs the study's ModularMLP with cross-entropy; "
                           "use --backend reference for other models or losses")


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
    fixed: torch.Tensor | None = None  # [C, d] bool: weights held at w* (``restrict``), or None

    def group(self, lo: int, hi: int) -> "_Chains":
        def rows(t):
            return None if t is None else t[lo:hi]
        return _Chains(self.ids[lo:hi], self.w_star[lo:hi], self.epsilon[lo:hi], self.gamma[lo:hi],
                       self.nbeta[lo:hi], rows(self.direction), self.example_offset[lo:hi], rows(self.fixed))


def _update_rule(batch: ChainBatch, chains: _Chains, config: SGLDConfig, device):
    """(the factor k_c/m the engine scales ∇L_m by [C, 1, 1], the in-place update ``(G, noise, projection)``)
    of ``config.sampler`` (formulas: ``sampling/sgld.py``)."""
    C, m = len(chains.ids), config.batch_size
    if config.sampler == "rmsprop_sgld":  # G = ∇L_m itself: the preconditioner needs the raw gradient
        state = RMSpropState(batch.W, config.rmsprop_alpha, config.rmsprop_eps)
        w_star = batch.W.clone()
        nbeta, gamma = batch.coefficient(chains.nbeta, device), batch.coefficient(chains.gamma, device)
        minus_half_eps = batch.coefficient(-chains.epsilon / 2, device)
        noise_scale = batch.coefficient(chains.epsilon.sqrt(), device)
        scale = torch.full((C, 1, 1), 1.0 / m, device=device)

        def update(G, noise, projection):
            rmsprop_sgld_update(batch.W, G, noise, state, w_star, nbeta, gamma, minus_half_eps, noise_scale,
                                projection)
        return scale, update

    # W ← W − decay·(W − W*) − drift·∇L_m + noise_scale·ξ  (``sgld.py``)
    decay = batch.coefficient(chains.epsilon * chains.gamma / 2, device)
    keep, noise_scale = 1 - decay, batch.coefficient(chains.epsilon.sqrt(), device)
    decay_w_star = batch.W * decay
    drift = chains.epsilon / 2 * chains.nbeta
    scale = (-drift / m).to(device=device, dtype=torch.float32).view(C, 1, 1)  # G = −drift·∇L_m (mean's 1/m)

    def update(G, noise, projection):
        sgld_update(batch.W, G, noise, noise_scale, keep, decay_w_star, projection)
    return scale, update


def _run_chains(chains: _Chains, arch, operands, targets, config: SGLDConfig, randomness, device,
                tick) -> tuple[torch.Tensor, torch.Tensor]:
    """SGLD for one group of chains: (loss trace [T, C], final weights [C, d] chain-major)."""
    C, m, T = len(chains.ids), config.batch_size, config.steps
    offset = PUBLISHED_LOSS_OFFSET if config.chain_loss == "published" else 0.0
    batch = ChainBatch(*arch, chains.w_star.to(device), m, loss_offset=offset)
    grad_scale, update = _update_rule(batch, chains, config, device)
    projection = None
    if chains.direction is not None:
        projection = (batch.rows(batch.G), batch.rows(batch.to_parameter_major(chains.direction.to(device))))
    fixed = None  # (flat indices of the fixed weights in the buffer, their w*)
    if chains.fixed is not None and bool(chains.fixed.any()):
        at = batch.to_parameter_major(chains.fixed.to(device)).nonzero().squeeze(1)
        fixed = (at, batch.W.index_select(0, at))
    example_offset = chains.example_offset.to(device).unsqueeze(1)
    draws = StepDraws(C, m, batch.d, device)
    trace = torch.empty(T, C, device=device)

    report_every = max(1, T // 100)
    for t in range(T):
        indices, noise = draws.draw(randomness, chains.ids, t, batch.blocks)
        examples = (indices + example_offset).view(-1)
        batch.loss_and_scaled_grad(operands.index_select(0, examples).view(C, m, 2),
                                   targets.index_select(0, examples).view(C, m), grad_scale, trace[t])
        update(batch.G, noise, projection)
        if fixed is not None:
            batch.W.index_copy_(0, *fixed)  # the fixed weights back at w*, exactly (keep·w* + decay·w* need not be)
        if (t + 1) % report_every == 0:
            tick(C * report_every)
    return trace.cpu().div_(-m), batch.to_chain_major(batch.W).cpu()


def sample_starts(starts: list[Start], config: SGLDConfig, *, randomness=None, device="cpu",
                  progress: bool = False, workers: int | None = None,
                  restrict: torch.Tensor | None = None) -> list[Samples]:
    """Run ``config.chains`` chains from every start as one batch; one ``Samples`` per start.

    ``restrict``: a bool mask [d] or [config.chains, d] (``sample``), the same for every start."""
    config.validate()
    device = torch.device(device)
    arch, n = check_starts(starts)
    S, C_per, T = len(starts), config.chains, config.steps
    C = S * C_per
    epsilon, gamma, nbeta = config.hyperparameters(n, samplers=SAMPLERS)

    d = flat_parameters(starts[0].model)[2].numel()
    keep = None if restrict is None else start_masks(restrict, C_per, d)  # refused before any work

    init_losses, w_star, direction = start_points(starts, config.orthogonal, keep)  # restricted: a row per chain
    w_star = w_star.repeat_interleave(C_per, 0)
    if direction is not None and keep is None:
        direction = direction.repeat_interleave(C_per, 0)
    chains = _Chains(np.arange(C, dtype=np.int64), w_star, epsilon.repeat(S), gamma.repeat(S), nbeta.repeat(S),
                     direction, torch.arange(C) // C_per * n, None if keep is None else ~keep.repeat(S, 1))
    operands, targets = stacked_examples(starts, device)
    randomness = for_run(randomness, config, n, d, chains=C)

    groups = chain_groups(C, device, min_per_group=min_chains_per_group(d), groups=workers or None)  # workers: tests
    results, seconds = run_groups_timed(
        lambda lo, hi, tick: _run_chains(chains.group(lo, hi), arch, operands, targets, config, randomness, device,
                                         tick),
        groups, total=C * T, desc=f"SGLD (torch, {C} chains)", progress=progress)

    trace = nan_from_first_non_finite(torch.cat([r[0] for r in results], dim=1).T.double())
    finals = torch.cat([r[1] for r in results])
    return per_start(trace, finals, init_losses, (epsilon, gamma, nbeta), NAME, device, seconds)


def sample(model, inputs, targets, loss_fn, config: SGLDConfig, *, randomness=None, device="cpu",
           progress: bool = False, restrict: torch.Tensor | None = None) -> Samples:
    """``restrict``: a bool mask [d] (every chain) or [C, d] (one row per chain) over the flat weights
    (``sampling/restrict.py``): only the selected weights move, the others stay at w* bit for bit."""
    require(device, model, loss_fn)
    return sample_starts([Start(model, inputs, targets)], config, randomness=randomness,
                         device=device, progress=progress, restrict=restrict)[0]
