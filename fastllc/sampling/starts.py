"""Starting points of a stacked batch (``batch.py``): the backends that stack starts (capability
``stacked_starts``) run ``config.chains`` chains from each, all in one batch.

A start is a trained study MLP (``fastllc.model.ModularMLP``, or any module with its ``p``, ``embed_dim`` and
``hidden_dim``) and the train split it is measured on. Starts share the architecture and the size of their
split (they are stacked).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from torch import nn

from ..errors import FastLLCError
from .contract import flat_parameters, loss_and_gradient_at_start, orthogonal_direction
from .restrict import restricted_directions


@dataclass
class Start:
    """A starting point w*: a trained study MLP and the train split it is measured on."""

    model: nn.Module
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


def start_points(starts: list[Start], orthogonal: bool, moves: torch.Tensor | None = None
                 ) -> tuple[list[float], torch.Tensor, torch.Tensor | None]:
    """Per start: L_n(w*), w* and (orthogonal) the unit ∇L_n(w*) — as (losses, [S, d], [S, d] or None) on the
    CPU; a start whose gradient vanishes gets a zero direction (nothing to restrict). Each model is
    evaluated on its own device and never moved.

    ``moves`` (a restriction, bool [C, d]: row j for chain j of every start): the directions are each chain's
    own, [S·C, d], row s·C + j the gradient of start s masked by ``moves[j]`` (``restrict.restricted_directions``)."""
    losses, gradients = [], []
    for s in starts:
        home = next(s.model.parameters()).device
        loss, gradient = loss_and_gradient_at_start(s.model, s.pairs.to(home), s.labels.to(home), F.cross_entropy)
        losses.append(loss)
        gradients.append(gradient.cpu())
    w_star = torch.stack([flat_parameters(s.model)[2].cpu() for s in starts])
    if not orthogonal:
        return losses, w_star, None
    if moves is not None:
        rows = [restricted_directions(g, moves) for g in gradients]
        return losses, w_star, torch.cat([torch.zeros(moves.shape) if r is None else r for r in rows])
    units = [orthogonal_direction(g) for g in gradients]
    return losses, w_star, torch.stack([g if g is not None else torch.zeros(w_star.shape[1]) for g in units])
