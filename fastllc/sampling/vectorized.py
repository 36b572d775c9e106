"""Placeholder while this backend is being written (session of 2026-11-29); never selected by ``auto``."""

from ..errors import FastLLCError


def supports(model, loss_fn, device=None) -> bool:
    return False


def sample(model, inputs, targets, loss_fn, config, *, randomness=None, device="cpu", progress=False):
    raise FastLLCError("this backend is not available yet")
