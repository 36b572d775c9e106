"""One stacked batch: every backend that stacks starts (``native``, ``torch``, ``triton``) prepares its run here
and hands its result back here, so that each of them is only the adapter of its kernel.

S starts (``starts.py``: a trained study MLP and its train split) × C = ``config.chains`` chains each: chain j of
start s is global chain s·C + j, its randomness keyed by that index. ``prepare`` checks everything before any
work, computes L_n(w*), ∇L_n(w*) and the orthogonal directions, and lays out the run:

    w_star          [S, d] float32     each start's weights (``rows`` expands to [S·C, d])
    direction       [S, d] or [S·C, d] the unit ∇L_n(w*) per start; per chain (masked) when restricted; or None
    moves           [d] or [S·C, d]    bool, the restriction (True: the weight moves); or None
    hyperparameters (ε, γ, nβ)         float64 [C] each: one start's chains (what each Samples records)
    coefficients    [S·C, 3] float64   the sampler's per-chain coefficients (SGLD: decay, drift, noise_scale)
    operands        [S·n, 2] int64     the stacked train splits: start s's at rows s·n .. (s+1)·n (on ``device``)
    targets         [S·n] int64
    example_offset  [S·C] int64        where each chain's split begins in operands/targets
    randomness                         CounterRandomness keyed by the seed, or the InjectedRandomness given

``finish`` applies the NaN rule (a diverged chain stays diverged) and splits the trace and the final weights
into one ``Samples`` per start.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .config import SGLDConfig
from .contract import Samples, nan_from_first_non_finite
from .randomness import for_run
from .restrict import check_mask
from .samplers import Sampler
from .starts import Start, check_starts, start_points


@dataclass
class Batch:
    """A prepared stacked run (fields: the module docstring)."""

    config: SGLDConfig
    arch: tuple[int, int, int]  # (p, e, h)
    n: int  # train examples per start
    d: int  # weights per chain
    S: int  # starts
    init_losses: list[float]
    w_star: torch.Tensor
    direction: torch.Tensor | None
    moves: torch.Tensor | None
    hyperparameters: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    sampler: Sampler
    operands: torch.Tensor
    targets: torch.Tensor
    example_offset: torch.Tensor
    randomness: object
    device: torch.device

    @property
    def C(self) -> int:
        """Chains per start."""
        return self.config.chains

    @property
    def chains(self) -> int:
        """Chains in the batch, S·C."""
        return self.S * self.config.chains

    @property
    def ids(self) -> np.ndarray:
        """[S·C] int64: the global chain indices, the randomness keys."""
        return np.arange(self.chains, dtype=np.int64)

    def rows(self, values: torch.Tensor) -> torch.Tensor:
        """Per-start rows [S, d] (or per-chain rows [S·C, d], as they are) as per-chain rows [S·C, d]."""
        return values if len(values) == self.chains else values.repeat_interleave(self.C, 0)

    def per_chain(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ε, γ, nβ) of every chain of the batch, float64 [S·C] each."""
        return tuple(v.repeat(self.S) for v in self.hyperparameters)

    def coefficients(self) -> torch.Tensor:
        """[S·C, 3] float64: the sampler's coefficient table (the fused kernels' sampler, SGLD, has one)."""
        return self.sampler.coefficients(*self.per_chain())


def prepare(starts: list[Start], config: SGLDConfig, *, restrict: torch.Tensor | None = None, randomness=None,
            device="cpu", samplers=("sgld",)) -> Batch:
    """The batch of ``config.chains`` chains from every start (see the module docstring), checked before any work.

    ``restrict``: a bool mask [d] or [config.chains, d] (``sampling/restrict.py``), the same for every start.
    ``samplers``: the names of the samplers the calling backend runs (None: every one, through its update)."""
    config = config.validate()
    arch, n = check_starts(starts)
    hyperparameters = config.hyperparameters(n, samplers=samplers)
    d = sum(p.numel() for p in starts[0].model.parameters() if p.requires_grad)
    S, C = len(starts), config.chains
    moves = None if restrict is None else check_mask(restrict, d, C).cpu()
    init_losses, w_star, direction = start_points(starts, config.orthogonal,
                                                  None if moves is None else moves.expand(C, d))
    operands = torch.cat([s.pairs.cpu() for s in starts]).long().to(device)
    targets = torch.cat([s.labels.cpu() for s in starts]).long().to(device)
    return Batch(config, arch, n, d, S, init_losses, w_star, direction,
                 moves if moves is None or moves.dim() == 1 else moves.repeat(S, 1), hyperparameters,
                 config.sampler_object(), operands, targets, torch.arange(S * C) // C * n,
                 for_run(randomness, config, n, d, chains=S * C), torch.device(device))


def finish(batch: Batch, trace: torch.Tensor, finals: torch.Tensor, seconds: float, backend: str) -> list[Samples]:
    """One ``Samples`` per start from the whole batch's loss trace [S·C, T] and final weights [S·C, d] (start s
    owns rows s·C .. (s+1)·C), after the NaN rule."""
    trace = nan_from_first_non_finite(trace.double())
    C = batch.C
    return [Samples(trace[s * C : (s + 1) * C].clone(), loss, *batch.hyperparameters, backend, str(batch.device),
                    seconds, finals[s * C : (s + 1) * C].clone(), chains_in_batch=batch.chains)
            for s, loss in enumerate(batch.init_losses)]
