"""Several starting points in one batch: what the backends that stack starts (capability
``stacked_starts``) share.

A start is a trained ModularMLP and the train split it is measured on. ``config.chains`` chains run from
every start, all in one batch: chain j of start s is global chain s·C + j, and its randomness is keyed
by that global index. Starts share the architecture and the size of their split (they are stacked).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import FastLLCError
from ..model import ModularMLP
from .contract import Samples, flat_parameters, loss_and_gradient_at_start, orthogonal_direction
from .restrict import restricted_directions


@dataclass
class Start:
    """A starting point w*: a trained ModularMLP and the train split it is measured on."""

    model: ModularMLP
    pairs: torch.Tensor  # [n, 2] int64
    labels: torch.Tensor  # [n] int64


def check_starts(starts: list[Start]) -> tuple[tuple[int, int, int], int]:
    """((p, e, h), n) shared by all ``starts``, or a one-line error saying what differs."""
    if not starts:
        raise FastLLCError("no starting points given")
    first = starts[0].model
    arch, n = (first.p, first.embed_dim, first.hidden_dim), len(starts[0].labels)
    for start in starts:
        if (start.model.p, start.model.embed_dim, start.model.hidden_dim) != arch:
            raise FastLLCError("all starting points of one batched run must share the architecture (p, e, h)")
        if len(start.labels) != n:
            raise FastLLCError("all starting points of one batched run must have train splits of equal size")
    return arch, n


def start_points(starts: list[Start], orthogonal: bool, keep: torch.Tensor | None = None
                 ) -> tuple[list[float], torch.Tensor, torch.Tensor | None]:
    """Per start: L_n(w*), w* and (orthogonal) the unit ∇L_n(w*) — as (losses, [S, d], [S, d] or None) on the
    CPU; a start whose gradient vanishes gets a zero direction (nothing to restrict). Each model is
    evaluated on its own device and never moved.

    ``keep`` (a restriction, bool [C, d]: row j for chain j of every start): the directions are each chain's
    own, [S·C, d], row s·C + j the gradient of start s masked by ``keep[j]`` (``restrict.restricted_directions``)."""
    losses, gradients = [], []
    for s in starts:
        home = next(s.model.parameters()).device
        loss, gradient = loss_and_gradient_at_start(s.model, s.pairs.to(home), s.labels.to(home), F.cross_entropy)
        losses.append(loss)
        gradients.append(gradient.cpu())
    w_star = torch.stack([flat_parameters(s.model)[2].cpu() for s in starts])
    if not orthogonal:
        return losses, w_star, None
    if keep is not None:
        rows = [restricted_directions(g, keep) for g in gradients]
        return losses, w_star, torch.cat([torch.zeros(keep.shape) if r is None else r for r in rows])
    units = [orthogonal_direction(g) for g in gradients]
    return losses, w_star, torch.stack([g if g is not None else torch.zeros(w_star.shape[1]) for g in units])


def stacked_examples(starts: list[Start], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(operands [S·n, 2], targets [S·n]) int64 on ``device``: start s's split at rows s·n .. (s+1)·n."""
    return (torch.cat([s.pairs.cpu() for s in starts]).long().to(device),
            torch.cat([s.labels.cpu() for s in starts]).long().to(device))


def per_start(trace: torch.Tensor, finals: torch.Tensor, init_losses: list[float], hyperparameters, backend: str,
              device, seconds: float) -> list[Samples]:
    """One ``Samples`` per start from the whole batch's loss trace [S·C, T] and final weights [S·C, d]
    (start s owns rows s·C .. (s+1)·C); ``hyperparameters`` are (ε, γ, nβ) of one start's C chains."""
    chains, total = len(hyperparameters[0]), len(trace)
    return [Samples(trace[s * chains : (s + 1) * chains].clone(), loss, *hyperparameters, backend, str(device),
                    seconds, finals[s * chains : (s + 1) * chains].clone(), chains_in_batch=total)
            for s, loss in enumerate(init_losses)]
