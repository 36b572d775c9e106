"""Weight-restricted sampling (the "refined" LLC of Wang et al. 2024; devinterp's
``optimize_over_per_model_param``): which weights the chains move, resolved once into a boolean mask over
the flat parameter vector (``contract.flat_parameters`` order).

A selection is one of, or a list of (their union):
    a parameter name or a glob pattern over ``named_parameters()`` (``fnmatch``, case-sensitive:
        ``"0.weight"``, ``"layers.1.*"``),
    a submodule of the model (every trainable parameter it holds),
    a dict ``{name: mask}`` with a boolean (or 0/1) mask of the parameter's shape (element-wise).
Only trainable parameters (``requires_grad``) are ever sampled, so only they can be selected. Bad input is a
one-line ``FastLLCError`` raised before any sampling.
"""

from __future__ import annotations

import difflib
import fnmatch

import torch
from torch import nn

from ..errors import FastLLCError


def selection_mask(model: nn.Module, restrict) -> torch.Tensor:
    """``restrict`` (see the module docstring) as a bool tensor [d] over the model's flat trainable weights."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    masks = {name: torch.zeros(p.shape, dtype=torch.bool) for name, p in named}
    items = list(restrict) if isinstance(restrict, (list, tuple)) else [restrict]
    for item in items:
        for name, mask in _select(model, named, item).items():
            masks[name] |= mask
    flat = torch.cat([masks[name].reshape(-1) for name, _ in named]) if named else torch.zeros(0, dtype=torch.bool)
    if not bool(flat.any()):
        raise FastLLCError("restrict selects no weights (an empty list, or every mask is False); select at least "
                           "one weight, or drop restrict to sample all of them")
    return flat


def _select(model, named, item) -> dict[str, torch.Tensor]:
    """{parameter name: bool mask} of one item of a selection."""
    shapes = {name: p.shape for name, p in named}
    if isinstance(item, str):
        hits = [name for name in shapes if fnmatch.fnmatchcase(name, item)]
        if not hits:
            raise FastLLCError(f"restrict: {item!r} matches no trainable parameter of the model"
                               f"{closest_names(item, shapes)}")
        return {name: torch.ones(shapes[name], dtype=torch.bool) for name in hits}
    if isinstance(item, nn.Module):
        if not any(item is module for module in model.modules()):
            raise FastLLCError(f"restrict: the {type(item).__name__} given is not a submodule of the model; pass one "
                               "of the model's own modules (model.named_modules())")
        own = {id(p) for p in item.parameters()}
        hits = [name for name, p in named if id(p) in own]
        if not hits:
            raise FastLLCError(f"restrict: the {type(item).__name__} given holds no trainable parameter of the model")
        return {name: torch.ones(shapes[name], dtype=torch.bool) for name in hits}
    if isinstance(item, dict):
        return {name: _element_mask(name, mask, shapes) for name, mask in item.items()}
    raise FastLLCError(f"restrict takes parameter names, glob patterns, submodules, a dict {{name: bool mask}} or a "
                       f"list of those, not {type(item).__name__}")


def _element_mask(name, mask, shapes) -> torch.Tensor:
    if name not in shapes:
        raise FastLLCError(f"restrict: mask for {name!r}, which is not a trainable parameter of the model"
                           f"{closest_names(str(name), shapes)}")
    mask = torch.as_tensor(mask).detach().cpu()
    if tuple(mask.shape) != tuple(shapes[name]):
        raise FastLLCError(f"restrict: the mask for {name!r} has shape {tuple(mask.shape)}, the parameter "
                           f"{tuple(shapes[name])}; give a boolean mask of the parameter's shape")
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise FastLLCError(f"restrict: the mask for {name!r} must be boolean (or 0/1), got other values")
        mask = mask != 0
    return mask


def closest_names(key: str, names) -> str:
    """'; closest: ...' naming the parameter names most like ``key`` (any, if none is alike)."""
    names = list(names)
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.4) or names[:3]
    return f"; closest: {', '.join(map(repr, close))} (see model.named_parameters())" if close else ""


def check_mask(mask: torch.Tensor, d: int) -> torch.Tensor:
    """A backend's check of the resolved mask it is given: bool, [d], selecting something."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (d,):
        raise FastLLCError(f"restrict must reach the backend as a bool tensor of shape ({d},) over the flat weights "
                           "(fastllc.sampling.restrict.selection_mask)")
    if not bool(mask.any()):
        raise FastLLCError("restrict selects no weights; select at least one weight, or drop restrict")
    return mask
