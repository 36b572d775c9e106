"""Weight-restricted sampling (the "refined" LLC of Wang et al. 2024; devinterp's
``optimize_over_per_model_param``): which weights the chains move, resolved once into a boolean mask over
the flat parameter vector (``contract.flat_parameters`` order).

A selection is one of, or a list of (their union):
    a parameter name or a glob pattern over ``named_parameters()`` (``fnmatch``, case-sensitive:
        ``"0.weight"``, ``"layers.1.*"``),
    a submodule of the model (every trainable parameter it holds),
    a dict ``{name: mask}`` with a boolean (or 0/1) mask of the parameter's shape (element-wise),
    a bool tensor [d] over the flat trainable weights (what ``selection_mask`` returns).
Only trainable parameters (``requires_grad``) are ever sampled, so only they can be selected. Bad input is a
one-line ``FastLLCError`` raised before any sampling.

A backend with the ``restrict`` capability takes the resolved mask as a bool tensor [d] (every chain) or
[C, d] (row c for chain c: e.g. per-layer groups in one batch, ``api.estimate_groups``); ``check_mask``
checks it, ``restricted_directions`` gives each chain's orthogonal direction (∇L_n(w*) masked by its row).
"""

from __future__ import annotations

import difflib
import fnmatch

import torch
from torch import nn

from ..errors import FastLLCError
from .contract import orthogonal_direction


def selection_mask(model: nn.Module, restrict, label: str = "restrict",
                   fallback: str = "drop restrict to sample all of them") -> torch.Tensor:
    """``restrict`` (see the module docstring) as a bool tensor [d] over the model's flat trainable weights.

    ``label`` names the selection in messages (``groups['embed']`` for a group), ``fallback`` is the advice
    when it selects nothing."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    masks = {name: torch.zeros(p.shape, dtype=torch.bool) for name, p in named}
    items = list(restrict) if isinstance(restrict, (list, tuple)) else [restrict]
    for item in items:
        for name, mask in _select(model, named, item, label).items():
            masks[name] |= mask
    flat = torch.cat([masks[name].reshape(-1) for name, _ in named]) if named else torch.zeros(0, dtype=torch.bool)
    if not bool(flat.any()):
        raise FastLLCError(f"{label} selects no weights (an empty list, or every mask is False); select at least "
                           f"one weight, or {fallback}")
    return flat


def _select(model, named, item, label) -> dict[str, torch.Tensor]:
    """{parameter name: bool mask} of one item of a selection."""
    shapes = {name: p.shape for name, p in named}
    if isinstance(item, str):
        hits = [name for name in shapes if fnmatch.fnmatchcase(name, item)]
        if not hits:
            raise FastLLCError(f"{label}: {item!r} matches no trainable parameter of the model"
                               f"{closest_names(item, shapes)}")
        return {name: torch.ones(shapes[name], dtype=torch.bool) for name in hits}
    if isinstance(item, nn.Module):
        if not any(item is module for module in model.modules()):
            raise FastLLCError(f"{label}: the {type(item).__name__} given is not a submodule of the model; pass one "
                               "of the model's own modules (model.named_modules())")
        own = {id(p) for p in item.parameters()}
        hits = [name for name, p in named if id(p) in own]
        if not hits:
            raise FastLLCError(f"{label}: the {type(item).__name__} given holds no trainable parameter of the model")
        return {name: torch.ones(shapes[name], dtype=torch.bool) for name in hits}
    if isinstance(item, dict):
        return {name: _element_mask(name, mask, shapes, label) for name, mask in item.items()}
    if isinstance(item, torch.Tensor):
        return _split_flat_mask(item, named, label)
    raise FastLLCError(f"{label} takes parameter names, glob patterns, submodules, a dict {{name: bool mask}}, a "
                       f"bool tensor over the flat weights or a list of those, not {type(item).__name__}")


def _element_mask(name, mask, shapes, label) -> torch.Tensor:
    if name not in shapes:
        raise FastLLCError(f"{label}: mask for {name!r}, which is not a trainable parameter of the model"
                           f"{closest_names(str(name), shapes)}")
    mask = torch.as_tensor(mask).detach().cpu()
    if tuple(mask.shape) != tuple(shapes[name]):
        raise FastLLCError(f"{label}: the mask for {name!r} has shape {tuple(mask.shape)}, the parameter "
                           f"{tuple(shapes[name])}; give a boolean mask of the parameter's shape")
    return _as_bool(mask, f"{label}: the mask for {name!r}")


def _as_bool(mask: torch.Tensor, what: str) -> torch.Tensor:
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise FastLLCError(f"{what} must be boolean (or 0/1), got other values")
        mask = mask != 0
    return mask


def _split_flat_mask(mask: torch.Tensor, named, label) -> dict[str, torch.Tensor]:
    """A bool tensor [d] over the flat trainable weights, cut into the parameters' masks."""
    d = sum(p.numel() for _, p in named)
    mask = mask.detach().cpu()
    if tuple(mask.shape) != (d,):
        raise FastLLCError(f"{label}: a flat mask has shape {tuple(mask.shape)}, the model has {d} trainable weights; "
                           f"give a bool tensor of shape ({d},) in named_parameters() order, or a dict "
                           "{name: mask of the parameter's shape}")
    mask = _as_bool(mask, f"{label}: the flat mask")
    pieces = mask.split([p.numel() for _, p in named])
    return {name: piece.reshape(p.shape) for (name, p), piece in zip(named, pieces)}


GROUPINGS = ("per-module", "per-parameter")


def group_masks(model: nn.Module, groups) -> dict[str, torch.Tensor]:
    """``groups`` (``api.estimate_groups``: a dict {name: selection}, ``"per-module"`` or ``"per-parameter"``) as
    {group name: bool mask [d]}, every selection checked (a one-line error naming the group)."""
    if isinstance(groups, str):
        if groups not in GROUPINGS:
            raise FastLLCError(f"groups must be a dict {{name: selection}}, 'per-module' or 'per-parameter', "
                               f"not {groups!r}")
        groups = _per_module(model) if groups == "per-module" else _per_parameter(model)
    if not isinstance(groups, dict):
        raise FastLLCError(f"groups must be a dict {{name: selection}}, 'per-module' or 'per-parameter', "
                           f"not {type(groups).__name__}")
    if not groups:
        raise FastLLCError("groups is empty (or the model has no trainable parameters); give at least one "
                           "{name: selection}")
    if len({str(name) for name in groups}) < len(groups):  # e.g. 1 and "1": one result would be lost
        raise FastLLCError(f"groups has names that read the same as text: {', '.join(map(repr, groups))}; "
                           "give every group a distinct name")
    return {str(name): selection_mask(model, selection, label=f"groups[{name!r}]", fallback="drop the group")
            for name, selection in groups.items()}


def _per_parameter(model: nn.Module) -> dict[str, dict]:
    """One group per trainable parameter tensor, named as in ``named_parameters()``."""
    return {name: {name: torch.ones(p.shape, dtype=torch.bool)}
            for name, p in model.named_parameters() if p.requires_grad}


def _per_module(model: nn.Module) -> dict[str, dict]:
    """One group per module holding trainable parameters itself (not through submodules), named as in
    ``named_modules()`` (the model itself: ``"(model)"``)."""
    canonical = {id(p): name for name, p in model.named_parameters()}  # a tied parameter: its first name
    groups = {}
    for module_name, module in model.named_modules():
        own = {canonical[id(p)]: torch.ones(p.shape, dtype=torch.bool)
               for p in module.parameters(recurse=False) if p.requires_grad}
        if own:
            groups[module_name or "(model)"] = own
    return groups


def closest_names(key: str, names) -> str:
    """'; closest: ...' naming the parameter names most like ``key`` (any, if none is alike)."""
    names = list(names)
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.4) or names[:3]
    return f"; closest: {', '.join(map(repr, close))} (see model.named_parameters())" if close else ""


def check_mask(mask: torch.Tensor, d: int, chains: int | None = None) -> torch.Tensor:
    """A backend's check of the resolved mask it is given: bool, [d] (every chain) or [chains, d] (one row per
    chain), every row selecting something. ``chains``: the run's chains (None: only [d] is checked for)."""
    shapes = [(d,)] + ([] if chains is None else [(chains, d)])
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) not in shapes:
        given = type(mask).__name__ if not isinstance(mask, torch.Tensor) else (
            tuple(mask.shape) if mask.dtype == torch.bool else f"{mask.dtype} {tuple(mask.shape)}")
        raise FastLLCError(f"restrict must reach the backend as a bool tensor of shape {' or '.join(map(str, shapes))} "
                           f"over the flat weights, got {given} (fastllc.sampling.restrict.selection_mask)")
    empty = (~mask.reshape(-1, d).any(dim=1)).nonzero().flatten().tolist()
    if empty:
        which = "" if mask.dim() == 1 else f" for chain {empty[0]}"
        raise FastLLCError(f"restrict selects no weights{which}; select at least one weight, or drop restrict")
    return mask


def restricted_directions(gradient: torch.Tensor, moves: torch.Tensor | None):
    """The orthogonal restriction's direction(s) in the restricted space: ∇L_n(w*) [d] masked by ``moves`` and
    normalised. ``moves`` None or [d]: one direction [d] (None where the masked gradient is zero); [C, d]: one
    row per chain, a zero row where that chain's masked gradient is zero (projecting on it changes nothing)."""
    if moves is None:
        return orthogonal_direction(gradient)
    moves = moves.to(gradient.device)
    if moves.dim() == 1:
        return orthogonal_direction(torch.where(moves, gradient, 0.0))
    distinct, row_of = torch.unique(moves, dim=0, return_inverse=True)  # groups repeat one row per chain
    rows = [orthogonal_direction(torch.where(row, gradient, 0.0)) for row in distinct]
    if all(row is None for row in rows):
        return None
    return torch.stack([torch.zeros_like(gradient) if row is None else row for row in rows])[row_of]
