"""The reference sampler: plain PyTorch, one chain at a time, one autograd call per step.

It is the ground truth every fast backend is tested against, so it is written for obviousness, not
speed: the SGLD step of ``SGLDConfig`` line by line on a flat weight vector, for any ``nn.Module``.
It runs with single-threaded torch ops, restoring the caller's thread count on return (``threads.py``):
one chain's tensors are small, intra-op threads gain little on them and stall when another process uses
the cores.
"""

from __future__ import annotations

import math
import time

import torch
from torch.func import functional_call
from tqdm.auto import tqdm

from .config import SGLDConfig
from .contract import Samples, flat_parameters, loss_and_gradient_at_start, orthogonal_direction, unflatten
from .randomness import CounterRandomness, InjectedRandomness
from .threads import single_threaded_torch


def supports(model, loss_fn, device=None) -> bool:
    """The reference runs any module and loss on any device."""
    return True


@single_threaded_torch()
def sample(model, inputs, targets, loss_fn, config: SGLDConfig, *, randomness=None, device="cpu",
           progress: bool = False) -> Samples:
    config.validate()
    model = model.to(device)
    inputs, targets = inputs.to(device), targets.to(device)
    n = len(targets)
    epsilon, gamma, nbeta = config.hyperparameters(n)
    names, shapes, w_star = flat_parameters(model)
    init_loss, gradient = loss_and_gradient_at_start(model, inputs, targets, loss_fn)
    direction = orthogonal_direction(gradient) if config.orthogonal else None
    if randomness is None:
        randomness = CounterRandomness(config.seed, n, config.batch_size, w_star.numel())
    elif isinstance(randomness, InjectedRandomness):
        randomness.check(config.chains, config.steps, n, config.batch_size, w_star.numel())

    trace = torch.full((config.chains, config.steps), math.nan, dtype=torch.float64)
    finals = torch.empty(config.chains, w_star.numel())
    bar = tqdm(total=config.chains * config.steps, desc="SGLD (reference)", disable=not progress, leave=False)
    start = time.perf_counter()
    for c in range(config.chains):
        eps, gam, nb = float(epsilon[c]), float(gamma[c]), float(nbeta[c])
        w = w_star.clone()
        for t in range(config.steps):
            indices, noise = randomness.draw(c, t)
            indices, noise = indices.to(device), noise.to(device)
            w.requires_grad_(True)
            loss = loss_fn(functional_call(model, unflatten(w, names, shapes), (inputs[indices],)), targets[indices])
            (grad,) = torch.autograd.grad(loss, w)
            w = w.detach()
            trace[c, t] = loss.item()
            if not math.isfinite(trace[c, t]):
                break  # the chain has diverged: the rest of its trace stays NaN, the estimator flags it
            increment = -(eps / 2) * (gam * (w - w_star) + nb * grad) + math.sqrt(eps) * noise
            if direction is not None:
                increment -= (increment @ direction) * direction
            w = w + increment
        finals[c] = w.cpu()
        bar.update(config.steps)
    bar.close()
    return Samples(trace, init_loss, epsilon, gamma, nbeta, "reference", str(torch.device(device)),
                   time.perf_counter() - start, finals)
