"""SGLD sampling: settings, randomness, the backend contract, and choosing a backend by name.

Backends (one module each, same signature, see ``contract.py``):
    reference   plain PyTorch, one chain at a time, autograd: the ground truth
    torch       the study's MLP, all chains in one set of tensors, hand-written backward (CPU and CUDA)
"""

from __future__ import annotations

import torch

from ..errors import FastLLCError
from . import batched, reference
from .config import SGLDConfig, default_nbeta
from .contract import Samples
from .randomness import CounterRandomness, InjectedRandomness

BACKENDS = {"reference": reference.sample, "torch": batched.sample}
BACKEND_CHOICES = ("auto", *BACKENDS)


def resolve_device(device: str | torch.device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise FastLLCError(f"unknown device {device!r}; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FastLLCError("device cuda requested but CUDA is not available on this machine")
    return device


def resolve_backend(name: str, device: torch.device, model=None, loss_fn=None) -> str:
    """The backend that ``name`` means (``auto``: the fastest one that supports the model and loss)."""
    if name == "auto":
        if model is None or batched.supports(model, loss_fn):
            return "torch"
        return "reference"
    if name not in BACKENDS:
        raise FastLLCError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_CHOICES)}")
    return name


def sample(model, inputs, targets, loss_fn, config: SGLDConfig, *, backend: str = "auto", device="cpu",
           randomness=None, progress: bool = False) -> Samples:
    device = resolve_device(device)
    name = resolve_backend(backend, device, model, loss_fn)
    return BACKENDS[name](model, inputs, targets, loss_fn, config.validate(), randomness=randomness,
                          device=device, progress=progress)


__all__ = ["SGLDConfig", "Samples", "CounterRandomness", "InjectedRandomness", "BACKENDS", "BACKEND_CHOICES",
           "default_nbeta", "resolve_backend", "resolve_device", "sample"]
