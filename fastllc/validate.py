"""Type checks of user-given arguments, in one place: every public entry point (``estimate``, ``calibrate``,
``SGLDConfig.validate``, sweep specs) refuses a wrong type here with a one-line ``FastLLCError`` that names the
argument, instead of a ``TypeError`` raised deep inside torch or a kernel.

``name`` is what the user wrote: ``"steps"`` from Python, ``"--steps"`` from the command line.
"""

from __future__ import annotations

import math
import numbers

from .errors import FastLLCError


def check_int(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an int; refused unless it is a whole number (not a bool, not 50.5, not "50") within
    [minimum, maximum]. numpy and torch integers pass: they are what array code hands over."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise FastLLCError(f"{name} must be a whole number, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise FastLLCError(f"{name} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise FastLLCError(f"{name} must be at most {maximum}, got {value}")
    return value


def check_float(name: str, value, minimum: float | None = None, *, above: float | None = None,
                maximum: float | None = None) -> float:
    """``value`` as a finite float; refused unless it is a real number (not a bool, not "1e-3") with
    value >= minimum, value > above and value <= maximum (each bound optional)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise FastLLCError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise FastLLCError(f"{name} must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise FastLLCError(f"{name} must be at least {minimum:g}, got {value:g}")
    if above is not None and not value > above:
        raise FastLLCError(f"{name} must be greater than {above:g}, got {value:g}")
    if maximum is not None and value > maximum:
        raise FastLLCError(f"{name} must be at most {maximum:g}, got {value:g}")
    return value


def check_bool(name: str, value) -> bool:
    """``value`` if it is True or False: a string such as "no" would otherwise count as true."""
    if not isinstance(value, bool):
        raise FastLLCError(f"{name} must be True or False, got {value!r}")
    return value


def check_choice(name: str, value, choices) -> str:
    """``value`` if it is one of the strings ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise FastLLCError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_numbers(name: str, value) -> None:
    """A per-chain setting (ε, γ, nβ): a number, a sequence of numbers or a tensor; refused early so that a
    string never reaches ``torch.as_tensor`` (its error does not name the setting)."""
    import torch

    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.dtype in (torch.int32, torch.int64):
            return
        raise FastLLCError(f"{name} must be a number or one number per chain, got a {value.dtype} tensor")
    kind = getattr(getattr(value, "dtype", None), "kind", None)  # a numpy array: its dtype says it all
    if kind is not None and getattr(value, "ndim", 0) > 0:
        if kind in "fiu":
            return
        raise FastLLCError(f"{name} must be a number or one number per chain, got an array of {value.dtype}")
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    for item in items:
        if isinstance(item, bool) or not isinstance(item, numbers.Real):
            raise FastLLCError(f"{name} must be a number or one number per chain, got {value!r}")
