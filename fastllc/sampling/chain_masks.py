"""Weight restriction (``restrict=``) in the backends that stack starts (``torch``, ``triton``): the mask each
chain gets and each chain's orthogonal direction, as the reference defines them (``backends/reference.py``).

A mask reaches a backend as a bool tensor over the flat weights (``contract.flat_parameters`` order,
``sampling/restrict.py`` resolves selections into one): [d] for every chain, or [C, d] with one row per chain
(e.g. one layer per chain: per-layer LLCs in one batch). With several starts, row j applies to chain j of
every start.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import FastLLCError
from .contract import loss_and_gradient_at_start, orthogonal_direction
from .restrict import check_mask


def chain_masks(restrict: torch.Tensor, chains: int, d: int) -> torch.Tensor:
    """``restrict`` as a bool [chains, d] mask on the CPU, or the one-line error saying what is wrong with it."""
    if not (isinstance(restrict, torch.Tensor) and restrict.dim() == 2):
        return check_mask(restrict, d).cpu().expand(chains, d)
    if restrict.dtype != torch.bool or tuple(restrict.shape) != (chains, d):
        raise FastLLCError(f"restrict must reach the backend as a bool tensor of shape ({d},) or ({chains}, {d}) "
                           f"(one row per chain) over the flat weights, got {restrict.dtype} "
                           f"{tuple(restrict.shape)} (fastllc.sampling.restrict.selection_mask)")
    empty = (~restrict.any(dim=1)).nonzero()
    if len(empty):
        raise FastLLCError(f"restrict selects no weights for chain {int(empty[0])}; select at least one weight "
                           "in every row, or drop restrict")
    return restrict.cpu()


def restricted_directions(starts, keep: torch.Tensor) -> torch.Tensor:
    """[S·C, d] on the CPU: the unit ∇L_n(w*) of chain j of start s (``starts.Start``) masked by ``keep[j]``,
    zero where the masked gradient vanishes (nothing to restrict: the reference then projects nothing)."""
    rows = []
    for s in starts:
        home = next(s.model.parameters()).device
        gradient = loss_and_gradient_at_start(s.model, s.pairs.to(home), s.labels.to(home), F.cross_entropy)[1].cpu()
        for row in keep:
            unit = orthogonal_direction(torch.where(row, gradient, 0.0))
            rows.append(unit if unit is not None else torch.zeros_like(gradient))
    return torch.stack(rows)
