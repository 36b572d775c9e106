"""C chains' weights in one parameter-major buffer (``layout.py``) with the sampler's update of them and the weights a
restriction holds at w*: what the backends that take any model's gradient by autograd share (``generic``, by
``torch.func.vmap``; ``transformer``, through its engine).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .config import SGLDConfig
from .contract import flat_parameters, on_device, start_of_run
from .layout import ParameterMajor
from .randomness import for_run
from .restrict import check_mask, restricted_directions


class ModelRun(NamedTuple):
    """One model's run, prepared for a backend that takes its gradient by autograd (``prepare_model_run``)."""

    model: torch.nn.Module  # on the device (a copy when the caller's lives elsewhere)
    inputs: torch.Tensor
    targets: torch.Tensor
    hyperparameters: tuple  # (ε, γ, nβ), float64 [C] each
    names: list
    shapes: list
    w_star: torch.Tensor  # [d]
    init_loss: float
    moves: torch.Tensor | None  # the restriction, bool [d] or [C, d]
    direction: torch.Tensor | None  # the orthogonal restriction's unit ∇L_n(w*) ([d], or [C, d] restricted)
    randomness: object


def prepare_model_run(model, inputs, targets, loss_fn, config: SGLDConfig, *, restrict=None, init_loss=None,
                      randomness=None, device="cpu") -> ModelRun:
    """What ``generic`` and ``transformer`` do before their chains, in one place (``batch.prepare`` is its
    counterpart for the backends that stack starts): the model and data on the device, the chains' settings,
    the flat weights, L_n(w*) and ∇L_n(w*) where needed (``start_of_run``), the mask and the directions, the
    randomness; every check before any work."""
    model = on_device(model, device)  # the caller's model is never moved
    inputs, targets = inputs.to(device), targets.to(device)
    n = len(targets)
    hyperparameters = config.hyperparameters(n, samplers=None)
    names, shapes, w_star = flat_parameters(model)
    init_loss, gradient = start_of_run(model, inputs, targets, loss_fn, gradient=config.orthogonal, init_loss=init_loss)
    moves = None if restrict is None else check_mask(restrict, w_star.numel(), config.chains)
    direction = restricted_directions(gradient, moves) if config.orthogonal else None  # from ∇L_n(w*) masked
    return ModelRun(model, inputs, targets, hyperparameters, names, shapes, w_star, init_loss, moves, direction,
                    for_run(randomness, config, n, w_star.numel()))


class ChainWeights(ParameterMajor):
    """C chains' weights in one parameter-major buffer, and the sampler's update of them."""

    def __init__(self, w_star: torch.Tensor, shapes, epsilon, gamma, nbeta, sampler, device):
        super().__init__(shapes, len(w_star))
        self.W = self.to_parameter_major(w_star.to(device))
        self.W_star = self.W.clone()
        self.G = torch.empty_like(self.W)
        self.weights = self.views(self.W)  # [C, *shape] per parameter: what the vmapped step reads
        self.epsilon, self.gamma, self.nbeta = epsilon, gamma, nbeta
        factor = self.coefficient(sampler.gradient_factor(epsilon, nbeta), device)
        self.gradient_factor = None if isinstance(factor, float) and factor == 1.0 else factor  # what ∇L_m is scaled by in G (SGLD: −drift)
        self.update = sampler.batched(self, self.W, epsilon, gamma, nbeta)
        self.frozen = None  # HeldWeights: the weights a restriction holds at w* (``restrict``)

    def restrict(self, moves: torch.Tensor) -> None:
        """Move only the weights where ``moves`` ([d], or [C, d]: one row per chain) is True; the others are held at w*."""
        self.frozen = HeldWeights(~self.to_parameter_major(moves.to(self.W.device).expand(self.C, self.d)), self.W_star)

    def step(self, noise: torch.Tensor, projection) -> None:
        """One step of every chain from the gradient ∇L_m in G (overwritten) and unit noise ξ."""
        if self.gradient_factor is not None:
            self.G.mul_(self.gradient_factor)
        self.update(self.G, noise, projection)
        if self.frozen is not None:
            self.frozen.restore(self.W)  # the fixed weights back at w*, exactly

    def chain_sum(self, flat: torch.Tensor) -> torch.Tensor:
        """Σ over each chain's elements of a parameter-major buffer, float64 [C]."""
        return sum(r.sum(dim=1, dtype=torch.float64) for r in self.rows(flat))


class HeldWeights:
    """The fixed weights of a restriction in the parameter-major buffer, and the two things done to them each
    step: ∇L_m zeroed there, w* copied back. A layer-wise restriction fixes a few long runs of the buffer
    (one per parameter and run of chains sharing a row), handled as slices: copies at memory speed. A scattered
    (element-wise) one goes by index and mask, which on the CPU cost ~10× more per element."""

    MAX_SLICES = 64  # beyond this many runs, one masked/indexed pass beats a Python loop of slices

    def __init__(self, frozen: torch.Tensor, W_star: torch.Tensor):
        edges = torch.diff(frozen.to(torch.int8), prepend=frozen.new_zeros(1, dtype=torch.int8),
                           append=frozen.new_zeros(1, dtype=torch.int8))
        starts, ends = (edges == 1).nonzero().flatten().tolist(), (edges == -1).nonzero().flatten().tolist()
        if len(starts) <= self.MAX_SLICES:
            self.slices = [slice(lo, hi) for lo, hi in zip(starts, ends)]
            self.w_star = [W_star[part].clone() for part in self.slices]
        else:
            self.slices, self.mask = None, frozen
            self.indices = frozen.nonzero().squeeze(1)
            self.w_star = W_star.index_select(0, self.indices)

    def zero(self, G: torch.Tensor) -> None:
        if self.slices is None:
            G.masked_fill_(self.mask, 0.0)
        else:
            for part in self.slices:
                G[part].zero_()

    def restore(self, W: torch.Tensor) -> None:
        if self.slices is None:
            W.index_copy_(0, self.indices, self.w_star)
        else:
            for part, values in zip(self.slices, self.w_star):
                W[part].copy_(values)


def chain_rows(values: torch.Tensor, ids: np.ndarray) -> torch.Tensor:
    """The rows ``ids`` of a per-chain [C, d] tensor; a [d] tensor (every chain's) as it is."""
    return values[torch.as_tensor(ids)] if values.dim() == 2 else values
