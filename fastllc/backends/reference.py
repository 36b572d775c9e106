"""The reference sampler: plain PyTorch, one chain at a time, one autograd call per step.

It is the ground truth every fast backend is tested against, so it is written for obviousness, not
speed: one chain at a time on a flat weight vector, for any ``nn.Module``, each step the sampler's own
one-chain ``increment`` (``sampling/samplers/``: each module states its update), then the orthogonal
projection and the restriction, line by line.
It runs with single-threaded torch ops, restoring the caller's thread count on return
(``sampling/threads.py``):
one chain's tensors are small, intra-op threads gain little on them and stall when another process uses
the cores.
"""

from __future__ import annotations

import math
import time

import torch
from torch.func import functional_call
from tqdm.auto import tqdm

from ..sampling.config import SGLDConfig
from ..sampling.contract import (Samples, chain_loss_fn, flat_parameters,
                                 on_device, start_of_run,
                                 private_buffers, unflatten)
from ..sampling.randomness import for_run
from ..sampling.restrict import check_mask, restricted_directions
from ..sampling.threads import single_threaded_torch

NAME = "reference"
CAPABILITIES = frozenset({"samplers", "restrict", "published_chain_loss"})
DEVICES = ("cpu", "cuda")
AUTO_PRIORITY = 100  # ``auto`` tries lower first: the last resort: runs anything


def supports(model, loss_fn, device=None) -> bool:
    """The reference runs any module and loss on any device."""
    return True


def require(device, model=None, loss_fn=None) -> None:
    """Nothing to refuse: see ``supports``."""


@single_threaded_torch()
def sample(model, inputs, targets, loss_fn, config: SGLDConfig, *, randomness=None, device="cpu",
           progress: bool = False, restrict: torch.Tensor | None = None, init_loss: float | None = None) -> Samples:
    """``restrict``: a bool mask [d] over the flat weights (``sampling/restrict.py``), or [C, d] with one row per
    chain: only those move, the others stay at w* bit for bit (the whole increment is masked; the orthogonal
    direction is ∇L_n(w*) masked by the chain's row)."""
    config.validate()
    model = on_device(model, device)  # the caller's model is never moved
    inputs, targets = inputs.to(device), targets.to(device)
    n = len(targets)
    epsilon, gamma, nbeta = config.hyperparameters(n, samplers=None)
    sampler = config.sampler_object()
    names, shapes, w_star = flat_parameters(model)
    init_loss, gradient = start_of_run(model, inputs, targets, loss_fn, gradient=config.orthogonal, init_loss=init_loss)
    step_loss = chain_loss_fn(loss_fn, config)  # what the chains follow; L_n(w*) is always loss_fn's
    moves = None if restrict is None else check_mask(restrict, w_star.numel(), config.chains).to(device)
    direction = restricted_directions(gradient, moves) if config.orthogonal else None  # from ∇L_n(w*) masked
    randomness = for_run(randomness, config, n, w_star.numel())

    trace = torch.full((config.chains, config.steps), math.nan, dtype=torch.float64)
    finals = torch.empty(config.chains, w_star.numel())
    buffers = private_buffers(model)  # e.g. BatchNorm's running statistics: updated here, not in the caller's model
    bar = tqdm(total=config.chains * config.steps, desc="SGLD (reference)", disable=not progress, leave=False)
    start = time.perf_counter()
    for c in range(config.chains):
        eps, gam, nb = float(epsilon[c]), float(gamma[c]), float(nbeta[c])
        moves_c, direction_c = _chain_row(moves, c), _chain_row(direction, c)
        if direction_c is not None and not bool(direction_c.any()):
            direction_c = None  # this chain's masked ∇L_n(w*) is zero: nothing to project out
        w = w_star.clone()
        state = sampler.start(w_star)
        for t in range(config.steps):
            indices, noise = randomness.draw(c, t)
            indices, noise = indices.to(device), noise.to(device)
            w.requires_grad_(True)
            weights = {**unflatten(w, names, shapes), **buffers}
            loss = step_loss(functional_call(model, weights, (inputs[indices],)), targets[indices])
            (grad,) = torch.autograd.grad(loss, w)
            w = w.detach()
            trace[c, t] = loss.item()
            if not math.isfinite(trace[c, t]):
                break  # the chain has diverged: the rest of its trace stays NaN, the estimator flags it
            increment, state = sampler.increment(state, w, w_star, grad, noise, eps, gam, nb)
            if direction_c is not None:
                increment -= (increment @ direction_c) * direction_c
            if moves_c is not None:
                increment = torch.where(moves_c, increment, 0.0)  # w + 0 = w: unselected weights never change
            w = w + increment
        finals[c] = w.cpu()
        bar.update(config.steps)
    bar.close()
    return Samples(trace, init_loss, epsilon, gamma, nbeta, NAME, str(torch.device(device)),
                   time.perf_counter() - start, finals)


def _chain_row(values: torch.Tensor | None, c: int) -> torch.Tensor | None:
    """Chain c's row of a per-chain [C, d] tensor; a [d] tensor (every chain's) or None as it is."""
    return values[c] if values is not None and values.dim() == 2 else values
