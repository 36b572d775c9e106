"""SGLD sampling: settings, randomness, the backend contract, and choosing a backend by name.

Backends (one module each, same signature, see ``contract.py``; imported only when used, so that e.g.
Triton is never loaded by a CPU run):
    reference   reference.py   plain PyTorch, one chain at a time, autograd: the ground truth
    torch       batched.py     the study's MLP, all chains in one set of tensors, hand-written backward
    triton      fused.py       the study's MLP, fused Triton kernels, many steps per launch (CUDA)
    generic     vectorized.py  any nn.Module: chains stacked and evaluated with torch.func.vmap

Each backend module has ``sample(...)`` and ``supports(model, loss_fn, device) -> bool``.
"""

from __future__ import annotations

import importlib

import torch

from ..errors import FastLLCError
from .config import SGLDConfig, default_nbeta
from .contract import Samples
from .randomness import CounterRandomness, InjectedRandomness

BACKENDS = {"reference": "reference", "torch": "batched", "triton": "fused", "generic": "vectorized"}
BACKEND_CHOICES = ("auto", *BACKENDS)
AUTO_ORDER = ("triton", "torch", "generic", "reference")  # the fastest first


def backend_module(name: str):
    """The module implementing backend ``name``."""
    return importlib.import_module(f"{__name__}.{BACKENDS[name]}")


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch.device; ``auto`` is CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise FastLLCError(f"unknown device {device!r}; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FastLLCError("device cuda requested but CUDA is not available on this machine")
    return device


def resolve_backend(name: str, device: torch.device, model=None, loss_fn=None) -> str:
    """The backend that ``name`` means (``auto``: the fastest one that supports the model, loss and device).

    Without a model (e.g. the CLI, before training) ``auto`` means the fastest for the study's MLP.
    """
    if name not in BACKEND_CHOICES:
        raise FastLLCError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_CHOICES)}")
    if name != "auto":
        require = getattr(backend_module(name), "require", None)
        if require is not None:
            require(device)  # e.g. triton without CUDA: the one-line reason, before any work is done
        return name
    if model is None:
        from ..model import ModularMLP
        import torch.nn.functional as F
        model, loss_fn = ModularMLP(3, 1, 1), F.cross_entropy
    for candidate in AUTO_ORDER:
        if backend_module(candidate).supports(model, loss_fn, device):
            return candidate
    return "reference"


def sample(model, inputs, targets, loss_fn, config: SGLDConfig, *, backend: str = "auto", device="cpu",
           randomness=None, progress: bool = False) -> Samples:
    device = resolve_device(device)
    name = resolve_backend(backend, device, model, loss_fn)
    return backend_module(name).sample(model, inputs, targets, loss_fn, config.validate(), randomness=randomness,
                                       device=device, progress=progress)


__all__ = ["SGLDConfig", "Samples", "CounterRandomness", "InjectedRandomness", "BACKENDS", "BACKEND_CHOICES",
           "backend_module", "default_nbeta", "resolve_backend", "resolve_device", "sample"]
