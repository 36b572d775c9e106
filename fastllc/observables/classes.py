"""Token classes: which class each recorded token loss belongs to, for susceptibilities per restriction × class.

Baker et al. 2025 ("Structural inference: interpreting small language models with susceptibilities",
arXiv:2504.18274) read per-token susceptibilities χ_xy (token y predicted in context x) and group them by token
pattern (word starts, induction patterns, delimiters, ...): a restriction whose χ is negative on one pattern and
positive on another is specialised to it. ``TokenClasses`` names such a grouping and ``class_weights`` turns it into
weights over the probe elements, which ``compute_susceptibilities(run, task, classes=...)`` applies to its per-token
χ (``Susceptibilities.classes`` [G, C]).

A token loss of a probe sequence is element k of the sequence: the loss of predicting token k + 1 from tokens ≤ k
(``observe_lm``). Its class comes from
- a vocabulary map: {class name: token ids}, {token id: class name}, or a LongTensor [V] of class ids (−1: no
  class) with ``names``; the token looked up is the predicted one (``of="target"``, the paper's y) or the last
  token of its context (``of="context"``, the end of x). Needs probe inputs that are token ids [N, K + 1].
- or per-position class ids, a LongTensor [N, K] over the probe elements (−1: no class), for patterns that depend
  on the context (an induction pattern, a word start), or probes that are not tokens.
Only elements that count (probe weight > 0) of the probe sets ``sets`` (default: all but the sampling task, as
``Susceptibilities.table``) join a class.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import FastLLCError
from ..validate import check_choice
from .recording import Probes

SOURCES = ("target", "context")


@dataclass(frozen=True)
class TokenClasses:
    """A grouping of probe elements (module docstring): ``ids`` [V] per token id or [N, K] per element, −1 none."""

    names: tuple
    ids: torch.Tensor
    per_position: bool
    of: str = "target"
    sets: tuple | None = None


def token_classes(classes, names=None, *, of: str = "target", sets=None) -> TokenClasses:
    """``classes`` as ``TokenClasses``: {name: token ids}, {token id: name}, a LongTensor [V] (vocabulary) or
    [N, K] (per position) of class ids with ``names`` (default "0", "1", ...). ``of``: which token a vocabulary map
    looks up; ``sets``: the probe sets whose tokens count (default: all but the sampling task)."""
    if isinstance(classes, TokenClasses):
        if names is not None or of != "target" or sets is not None:
            raise FastLLCError("token classes already made (TokenClasses) take no names/of/sets; give them to "
                               "token_classes when making them")
        return classes
    check_choice("of", of, SOURCES)
    if isinstance(classes, dict):
        ids, names = _from_dict(classes)
    else:
        ids = _integers(classes, "token classes (integer class ids [vocabulary] or [examples, tokens], or a dict)")
        if ids.dim() not in (1, 2):
            raise FastLLCError(f"token classes must be class ids [vocabulary] or [examples, tokens], got "
                               f"{ids.dim()} dimensions")
        count = int(ids.max()) + 1 if ids.numel() else 0
        names = tuple(str(c) for c in range(count)) if names is None else tuple(map(str, names))
        if count > len(names) or bool((ids < -1).any()):
            raise FastLLCError(f"token class ids must lie in [-1, {len(names)}) for the {len(names)} names given")
    if not names or len(set(names)) < len(names):
        raise FastLLCError(f"token classes need at least one class and distinct names, got {list(names)} (class "
                           "ids all -1 name no class)")
    return TokenClasses(names, ids, ids.dim() == 2, of, None if sets is None else tuple(sets))


def _integers(value, what: str) -> torch.Tensor:
    """``value`` (a tensor, array or sequence) as a LongTensor; anything else, or any non-integer (float, complex,
    bool: ``.long()`` would truncate it), refused in one line naming ``what``."""
    try:
        ids = torch.as_tensor(value if isinstance(value, (torch.Tensor, np.ndarray)) else list(value))
    except (TypeError, ValueError, RuntimeError):
        raise FastLLCError(f"{what} must be integers, got {value!r}") from None
    if ids.numel() and (ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool):  # [] is float
        raise FastLLCError(f"{what} must be integers, got {ids.dtype}")
    return ids.long()


def _from_dict(classes: dict) -> tuple:
    """{name: token ids} or {token id: name} → (ids [V], names); a token in two classes is refused."""
    if not classes:
        raise FastLLCError("token classes must not be empty")
    if all(isinstance(key, str) for key in classes):
        members = {name: _integers(ids, f"token classes[{name!r}] (a list of token ids)").reshape(-1)
                   for name, ids in classes.items()}
    elif all(isinstance(key, (int, np.integer)) and not isinstance(key, bool) for key in classes):
        names = list(dict.fromkeys(map(str, classes.values())))
        members = {name: torch.tensor([int(t) for t, c in classes.items() if str(c) == name]) for name in names}
    else:
        raise FastLLCError("token classes must be {class name: token ids} or {token id: class name}: keys all "
                           f"strings or all integers, got {[type(k).__name__ for k in classes]}")
    every = torch.cat(list(members.values()))
    if len(every) == 0 or bool((every < 0).any()):
        raise FastLLCError("token classes must list non-negative token ids")
    if len(torch.unique(every)) < len(every):
        raise FastLLCError("a token id is in more than one class; each token belongs to at most one")
    ids = torch.full((int(every.max()) + 1,), -1, dtype=torch.long)
    for c, member in enumerate(members.values()):
        ids[member] = c
    return ids, tuple(members)


def element_classes(spec: TokenClasses, probes: Probes) -> torch.Tensor:
    """The class id of every probe element [N, K] (−1: none)."""
    n, k = probes.weights.shape
    if spec.per_position:
        if tuple(spec.ids.shape) != (n, k):
            raise FastLLCError(f"per-position token classes must be [{n}, {k}] (the probe elements), got "
                               f"{list(spec.ids.shape)}")
        return spec.ids
    inputs = probes.inputs
    if inputs.is_floating_point() or inputs.dim() != 2 or inputs.shape[1] != k + 1:
        raise FastLLCError(f"a vocabulary of token classes needs probe inputs of token ids [N, {k + 1}]; give class "
                           f"ids per position [{n}, {k}] instead")
    looked_up = inputs[:, 1:] if spec.of == "target" else inputs[:, :-1]
    known = looked_up < len(spec.ids)  # tokens past the map's end have no class
    return torch.where(known, spec.ids[looked_up.clamp(max=len(spec.ids) - 1)], torch.full_like(looked_up, -1))


def class_weights(spec: TokenClasses, probes: Probes, task: str) -> tuple:
    """(weights [C, N, K] float64, each class's weights summing to 1 (NaN for a class with no token: its χ is
    NaN), token counts [C]): a class's χ is ⟨weights, χ_token⟩, the χ of its tokens' mean loss."""
    ids = element_classes(spec, probes)
    chosen = spec.sets if spec.sets is not None else tuple(name for name in probes.names if name != task)
    in_sets = torch.zeros(probes.examples, dtype=torch.bool)
    for name in chosen:
        in_sets[probes.rows(name)] = True
    counts = (probes.weights > 0) & in_sets[:, None]
    weights = torch.stack([torch.where(counts & (ids == c), probes.weights, 0.0) for c in range(len(spec.names))])
    tokens = (weights > 0).sum(dim=(1, 2))
    totals = weights.sum(dim=(1, 2), keepdim=True)
    return weights / totals, tokens  # 0/0: NaN for an empty class


__all__ = ["SOURCES", "TokenClasses", "class_weights", "element_classes", "token_classes"]
