"""Samplers: each update rule is one small object, its math in its module's docstring.

A sampler module here (every module whose name does not start with ``_``) defines ``SAMPLER``, a subclass of
``Sampler`` (``_base.py``: what a sampler provides). ``SGLDConfig.sampler`` takes a sampler object or the
name of one that needs no values beyond ``SGLDConfig``'s fields (``from_config``); backends ask the object
for the update, never the name. Adding a sampler is adding its module and its test: the reference,
``torch`` and ``generic`` backends run every sampler through its own update (capability ``samplers``),
while the fused kernels (``native``, ``triton``) run the one they were written for (``sgld``).
"""

from __future__ import annotations

import importlib
import pkgutil

from ...errors import FastLLCError
from ._base import Sampler


def names() -> tuple[str, ...]:
    """Every sampler's name: the modules of this package (listed, not imported)."""
    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")))


def sampler_class(name: str) -> type[Sampler]:
    """The class of the sampler called ``name``, or a one-line error listing the known ones."""
    if name not in names():
        raise FastLLCError(f"unknown sampler {name!r}; choose one of {', '.join(names())}")
    return importlib.import_module(f"{__name__}.{name}").SAMPLER


def by_name() -> tuple[str, ...]:
    """The samplers a name alone selects (what ``--sampler`` offers): those needing no values of their own."""
    return tuple(name for name in names() if sampler_class(name).NAMEABLE)


def resolve(config) -> Sampler:
    """The sampler object ``config.sampler`` means: the object itself, or the named one with ``config``'s settings."""
    if isinstance(config.sampler, Sampler):
        return config.sampler
    if not isinstance(config.sampler, str):
        raise FastLLCError(f"sampler must be a sampler's name or object, got {type(config.sampler).__name__}")
    return sampler_class(config.sampler).from_config(config)


__all__ = ["Sampler", "by_name", "names", "resolve", "sampler_class"]
