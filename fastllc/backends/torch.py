"""Backend ``torch``: every chain of the study's MLP in one set of tensors, with a hand-written backward.

The forward and backward of all chains are the engine's (``fastllc/engines/mlp.py``, ``ChainBatch``); the
layout is ``sampling/layout.py``'s, the update the sampler's (``sampling/samplers/``). Several starting points (checkpoints or seeds
of one architecture, each with its own train split of equal size) run as one batch: ``sample_starts``
(``sampling/starts.py``).

On the CPU the chains run in groups, one per core, each in its own thread with single-threaded torch ops
(``sampling/threads.py``: the operations are too small for intra-op threads, which stall on a busy machine).

Beyond plain SGLD with exact cross-entropy, as the reference defines them (``backends/reference.py``):
``chain_loss="published"`` (the chains follow −log(p_y + δ): ``ChainBatch(loss_offset=δ)``), every sampler
(its ``batched`` update on the same layout) and ``restrict`` (a bool mask [d] for all chains or [C, d],
one row per chain: the fixed weights are copied back from w* after every update, so they stay there bit for
bit; the orthogonal direction is each chain's ∇L_n(w*) masked by its row).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..engines.mlp import ChainBatch, is_study_mlp
from ..errors import FastLLCError
from ..sampling.batch import Batch, finish, prepare
from ..sampling.config import PUBLISHED_LOSS_OFFSET, SGLDConfig
from ..sampling.contract import Samples
from ..sampling.layout import StepDraws
from ..sampling.starts import Start
from ..sampling.threads import chain_groups, min_chains_per_group, run_groups_timed

NAME = "torch"
CAPABILITIES = frozenset({"stacked_starts", "published_chain_loss", "restrict", "samplers"})
DEVICES = ("cpu", "cuda")
AUTO_PRIORITY = 20  # ``auto`` tries lower first: the study's MLP on CPU


def supports(model, loss_fn, device=None) -> bool:
    """The study's MLP with cross-entropy, on any device."""
    return model is None or is_study_mlp(model, loss_fn)


def require(device, model=None, loss_fn=None) -> None:
    """The one-line reason this backend cannot run ``model`` with ``loss_fn`` (when given), else nothing."""
    if model is not None and not supports(model, loss_fn, device):
        raise FastLLCError("the torch backend runs the study's ModularMLP with cross-entropy; "
                           "use --backend reference for other models or losses")


def _run_chains(batch: Batch, lo: int, hi: int, tick) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampler's chains lo .. hi of the batch: (loss trace [T, hi − lo], final weights [hi − lo, d] chain-major)."""
    config, device = batch.config, batch.device
    C, m, T = hi - lo, config.batch_size, config.steps
    offset = PUBLISHED_LOSS_OFFSET if config.chain_loss == "published" else 0.0
    chains = ChainBatch(*batch.arch, batch.rows(batch.w_star)[lo:hi].to(device), m, loss_offset=offset)
    epsilon, gamma, nbeta = (v[lo:hi] for v in batch.per_chain())
    update = batch.sampler.batched(chains, chains.W, epsilon, gamma, nbeta)
    # the engine writes factor·∇L_m into G, the mean's 1/m folded in
    grad_scale = (batch.sampler.gradient_factor(epsilon, nbeta) / m).to(device=device, dtype=torch.float32).view(C, 1, 1)
    projection = None
    if batch.direction is not None:
        direction = chains.to_parameter_major(batch.rows(batch.direction)[lo:hi].to(device))
        projection = (chains.rows(chains.G), chains.rows(direction))
    held = None  # (flat indices of the weights a restriction holds at w*, their w*)
    if batch.moves is not None and not bool(batch.moves.all()):
        at = chains.to_parameter_major((~batch.moves.expand(batch.chains, batch.d)[lo:hi]).to(device)).nonzero().squeeze(1)
        held = (at, chains.W.index_select(0, at))
    example_offset = batch.example_offset[lo:hi].to(device).unsqueeze(1)
    ids, draws, trace = batch.ids[lo:hi], StepDraws(C, m, chains.d, device), torch.empty(T, C, device=device)
    report_every = max(1, T // 100)
    for t in range(T):
        indices, noise = draws.draw(batch.randomness, ids, t, chains.blocks)
        examples = (indices + example_offset).view(-1)
        chains.loss_and_scaled_grad(batch.operands.index_select(0, examples).view(C, m, 2),
                                    batch.targets.index_select(0, examples).view(C, m), grad_scale, trace[t])
        update(chains.G, noise, projection)
        if held is not None:
            chains.W.index_copy_(0, *held)  # held weights back at w*, exactly (keep·w* + decay·w* need not be)
        if (t + 1) % report_every == 0:
            tick(C * report_every)
    return trace.cpu().div_(-m), chains.to_chain_major(chains.W).cpu()


def sample_starts(starts: list[Start], config: SGLDConfig, *, randomness=None, device="cpu",
                  progress: bool = False, workers: int | None = None,
                  restrict: torch.Tensor | None = None) -> list[Samples]:
    """Run ``config.chains`` chains from every start as one batch (``sampling/batch.py``); one ``Samples`` per start.

    ``restrict``: a bool mask [d] or [config.chains, d] (``sample``), the same for every start."""
    batch = prepare(starts, config, restrict=restrict, randomness=randomness, device=device, samplers=None)
    C, T = batch.chains, config.steps
    groups = chain_groups(C, batch.device, min_per_group=min_chains_per_group(batch.d), groups=workers or None)
    results, seconds = run_groups_timed(lambda lo, hi, tick: _run_chains(batch, lo, hi, tick), groups,
                                        total=C * T, desc=f"SGLD (torch, {C} chains)", progress=progress)
    trace = torch.cat([r[0] for r in results], dim=1).T
    return finish(batch, trace, torch.cat([r[1] for r in results]), seconds, NAME)


def sample(model, inputs, targets, loss_fn, config: SGLDConfig, *, randomness=None, device="cpu",
           progress: bool = False, restrict: torch.Tensor | None = None, init_loss: float | None = None) -> Samples:
    """``restrict``: a bool mask [d] (every chain) or [C, d] (one row per chain) over the flat weights
    (``sampling/restrict.py``): only the selected weights move, the others stay at w* bit for bit."""
    require(device, model, loss_fn)
    samples = sample_starts([Start(model, inputs, targets)], config, randomness=randomness,
                            device=device, progress=progress, restrict=restrict)[0]
    return samples if init_loss is None else replace(samples, init_loss=float(init_loss))  # the caller's L_n(w*)
