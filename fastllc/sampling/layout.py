"""The parameter-major layout of C chains' weights, what every batched backend (``torch``, ``generic``) and the
engine (``fastllc/engines/mlp.py``) share, and the host buffers each step's randomness is drawn into.

All chains' weights are one flat buffer in which parameter j (canonical order) occupies
W[C·off_j : C·off_{j+1}] as a contiguous [C, *shape] tensor, so batched matmuls read contiguous operands
(strided ones take a slow path on CPU) and a sampler's update (``sampling/samplers/``) runs over the whole
buffer at once. Per-chain coefficients are Python floats when every chain shares them (cheaper), else
buffers of the same layout (``ParameterMajor.coefficient``).
"""

from __future__ import annotations

import math

import numpy as np
import torch


class ParameterMajor:
    """The layout of C chains' copies of parameters with ``shapes`` in one flat buffer (see the docstring)."""

    def __init__(self, shapes, chains: int):
        self.C = chains
        self.blocks = np.cumsum([0] + [math.prod(s) for s in shapes]).astype(np.int64)
        self.d = int(self.blocks[-1])
        self.block_shapes = [tuple(s) for s in shapes]

    def views(self, flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each parameter's block of a flat buffer as a [C, *shape] view."""
        return tuple(flat[self.C * lo : self.C * hi].view(self.C, *shape)
                     for shape, lo, hi in zip(self.block_shapes, self.blocks[:-1], self.blocks[1:]))

    def rows(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Each parameter's block of a flat buffer as a [C, size] view."""
        return [flat[self.C * lo : self.C * hi].view(self.C, int(hi - lo))
                for lo, hi in zip(self.blocks[:-1], self.blocks[1:])]

    def to_parameter_major(self, rows: torch.Tensor) -> torch.Tensor:
        """[C, d] chain-major (or [C] per-chain values, broadcast) → flat parameter-major [C·d]."""
        rows = rows.unsqueeze(1).expand(self.C, self.d) if rows.dim() == 1 else rows
        return torch.cat([rows[:, lo:hi].reshape(-1) for lo, hi in zip(self.blocks[:-1], self.blocks[1:])])

    def to_chain_major(self, flat: torch.Tensor) -> torch.Tensor:
        """Flat parameter-major [C·d] → [C, d] chain-major."""
        return torch.cat(self.rows(flat), dim=1)

    def coefficient(self, values: torch.Tensor, device):
        """Per-chain ``values`` [C]: a Python float when every chain shares it (cheaper), else expanded to
        the buffer's layout (float32 on ``device``)."""
        if bool((values == values[0]).all()):
            return float(values[0])
        return self.to_parameter_major(values.to(device=device, dtype=torch.float32))


def axpy(target: torch.Tensor, x: torch.Tensor, coefficient) -> torch.Tensor:
    """target += coefficient·x in place, for a float or a parameter-major coefficient."""
    if isinstance(coefficient, float):
        return target.add_(x, alpha=coefficient)
    return target.addcmul_(x, coefficient)


def project_out(x_rows: list[torch.Tensor], g_rows: list[torch.Tensor]) -> None:
    """x[c] −= (x[c]·g[c])·g[c] for every chain c, in place; both given as per-parameter [C, size] views."""
    coefficient = sum(torch.linalg.vecdot(x, g) for x, g in zip(x_rows, g_rows)).unsqueeze(1)
    for x, g in zip(x_rows, g_rows):
        x.addcmul_(g, coefficient, value=-1)


class StepDraws:
    """Host buffers that a ``randomness`` fills with every chain's minibatch indices and unit noise of one
    step (Numba writes into NumPy views), and their copies on the device the chains run on."""

    def __init__(self, chains: int, batch_size: int, dim: int, device: torch.device):
        pin = device.type == "cuda"  # pinned host memory: faster copies to the GPU
        self.indices_host = torch.empty(chains, batch_size, dtype=torch.int64, pin_memory=pin)
        self.noise_host = torch.empty(chains * dim, dtype=torch.float32, pin_memory=pin)
        self.indices_np, self.noise_np = self.indices_host.numpy(), self.noise_host.numpy()
        self.noise = self.noise_host if device.type == "cpu" else torch.empty(chains * dim, device=device)
        self.device = device

    def draw(self, randomness, ids: np.ndarray, step: int, blocks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices [C, m] on the device, unit noise [C·d] parameter-major on the device) of step ``step``."""
        randomness.fill(ids, step, self.indices_np, self.noise_np, blocks)
        # blocking copies: the host buffers are refilled next step (untested on CUDA: no GPU here)
        indices = self.indices_host.to(self.device)
        if self.noise is not self.noise_host:
            self.noise.copy_(self.noise_host)
        return indices, self.noise
