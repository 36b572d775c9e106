"""What every sampling backend shares: settings (``config.py``), randomness (``randomness.py``), what a
backend returns and the start of every run (``contract.py``), several starting points in one batch
(``starts.py``, ``batch.py``), the samplers (``samplers/``: each update rule a small object), the
parameter-major layout (``layout.py``), and how chains use the CPU (``threads.py``). The backends themselves, and the registry that chooses one: ``fastllc.backends``.
"""

from __future__ import annotations

import torch

from ..errors import FastLLCError
from .config import SGLDConfig, wbic_nbeta
from .contract import Samples
from .randomness import CounterRandomness, InjectedRandomness
from .samplers.preconditioned_sgld import PreconditionedSGLD
from .samplers.rmsprop_sgld import RMSPropSGLD
from .samplers.sgld import SGLD


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


__all__ = ["SGLDConfig", "Samples", "CounterRandomness", "InjectedRandomness", "PreconditionedSGLD", "RMSPropSGLD",
           "SGLD", "wbic_nbeta", "resolve_device"]
