"""The loss landscape at w*, measured before sampling: what sets SGLD's step size and what "left the basin" means.

- ``top_curvature``: κ, the largest eigenvalue of the Hessian of L_n at w* (power iteration on Hessian-vector
  products, ``torch.func``). SGLD's step on the stiffest direction is stable only for ε·nβ·κ < 4, and its
  Euler discretisation inflates that direction's variance by 1/(1 − ε·nβ·κ/4); the *step scale*
  s = ε·nβ·κ is therefore the natural unit for ε, comparable across models (calibration's grid is in s).
- ``nearby_curvature``: the same at points around w* at the tempered posterior's quartic scale, for a w*
  whose own curvature is (nearly) zero.
- ``gradient_noise``: the variance of minibatch gradients at w*, which heats the chains in proportion to ε as
  the Euler step does; nβ times it adds to κ in the step scale.
- ``rmsprop_preconditioner``: RMSProp-SGLD's P = 1/(√V + δ) at w*; with it ``top_curvature`` gives the
  largest eigenvalue of P^½ H P^½, so that the same step scale means the same thing for both samplers.
- ``trivial_loss``: the loss of the same model with every weight at zero (for a classifier: the uniform
  prediction, log(classes); for a regression: the loss of the zero output). A chain whose sampled loss climbs
  a fair part of the way from L_n(w*) towards it has left w*'s basin: its λ̂ = nβ·ΔL then measures the
  temperature, not the geometry at w*.
"""

from __future__ import annotations

import math

import torch
from torch.func import functional_call, grad, jvp

EXAMPLES = 32_768  # curvature and trivial loss on the first examples (all of a data set this size: a subset would
# break the exact orthogonality of a constructed problem, and its noise is the Hessian of a flat w*)


def _subset(data, examples: int):
    inputs, targets = data
    return inputs[:examples], targets[:examples]


def top_curvature(model: torch.nn.Module, data, loss_fn, *, examples: int = EXAMPLES, iterations: int = 30,
                  seed: int = 0, preconditioner: dict | None = None, offset: dict | None = None) -> float:
    """κ: the largest Hessian eigenvalue of the mean loss at the model's weights, by power iteration
    (``iterations`` Hessian-vector products on the first ``examples`` examples). Returns |κ| ≥ 0; a saddle's
    negative eigenvalue of largest magnitude counts by its size (it limits the step the same way).

    ``preconditioner`` {name: P ≥ 0 of the parameter's shape}: the largest eigenvalue of P^½ H P^½ instead,
    the curvature a step preconditioned by P sees (RMSProp-SGLD's ε·P in place of ε). ``offset`` {name: δ}:
    at w* + δ instead of w*."""
    inputs, targets = _subset(data, examples)
    params = {name: p.detach() + (0 if offset is None else offset[name])
              for name, p in model.named_parameters() if p.requires_grad}
    buffers = {name: b.detach() for name, b in model.named_buffers()}

    def loss(weights):
        return loss_fn(functional_call(model, (weights, buffers), (inputs,)), targets)

    gradient = grad(loss)
    generator = torch.Generator().manual_seed(seed)
    vector = {n: torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for n, p in params.items()}
    scale = {n: (preconditioner[n].sqrt() if preconditioner is not None else 1.0) for n in params}
    eigenvalue = 0.0
    for _ in range(iterations):
        norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in vector.values()))
        if norm == 0 or not math.isfinite(norm):
            return 0.0 if norm == 0 else math.nan
        vector = {n: v / norm for n, v in vector.items()}
        _, product = jvp(gradient, (params,), ({n: v * scale[n] for n, v in vector.items()},))
        product = {n: product[n] * scale[n] for n in params}
        eigenvalue = sum(float((product[n].double() * vector[n].double()).sum()) for n in params)
        vector = product
    return abs(eigenvalue)


def nearby_curvature(model: torch.nn.Module, data, loss_fn, nbeta: float, *, points: int = 4, seed: int = 0,
                     preconditioner: dict | None = None) -> float:
    """The largest ``top_curvature`` at ``points`` random points w* + δ, δ ~ N(0, nβ^(−½)·I): where a w* with no
    curvature of its own (all directions flat, as at the most singular point of a product of monomials) puts
    its chains. nβ^(−¼) per coordinate is the scale at which a quartic term nβ·w⁴ reaches one unit of the
    tempered potential."""
    generator = torch.Generator().manual_seed(seed + 1)
    scale = nbeta ** -0.25
    largest = 0.0
    for point in range(points):
        offset = {name: scale * torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
                  for name, p in model.named_parameters() if p.requires_grad}
        largest = max(largest, top_curvature(model, data, loss_fn, seed=seed + point, preconditioner=preconditioner,
                                             offset=offset))
    return largest


def minibatch_gradients(model: torch.nn.Module, data, loss_fn, *, batch_size: int, batches: int = 32,
                        seed: int = 0) -> list[dict]:
    """∇L_B at w* for ``batches`` minibatches of ``batch_size`` examples drawn with replacement ({name: tensor})."""
    inputs, targets = data
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    buffers = {name: b.detach() for name, b in model.named_buffers()}

    def loss(weights, x, y):
        return loss_fn(functional_call(model, (weights, buffers), (x,)), y)

    gradient = grad(loss)
    generator = torch.Generator().manual_seed(seed)
    draws = []
    for _ in range(batches):
        rows = torch.randint(0, len(targets), (batch_size,), generator=generator)
        draws.append({n: g.detach() for n, g in gradient(params, inputs[rows], targets[rows]).items()})
    return draws


def gradient_noise(model: torch.nn.Module, data, loss_fn, *, batch_size: int, batches: int = 32, seed: int = 0,
                   preconditioner: dict | None = None) -> float:
    """The mean over weights of Var_B(∂_j L_B) at w*, the variance of a minibatch gradient across minibatches of
    ``batch_size`` (``minibatch_gradients``), weighted by P_j with a ``preconditioner``.

    Why: SGLD's step adds (ε·nβ/2)²·Var_B(∇L_B) of minibatch noise to the ε it injects, so each direction runs
    hotter by the factor 1 + ε·nβ²·Var_B/4, which raises λ̂ in proportion to ε as the Euler step's ε·nβ·κ/4 does:
    nβ·Var_B adds to κ in the step scale (measured: +10% on regular models at s = 0.1 without it)."""
    draws = minibatch_gradients(model, data, loss_fn, batch_size=batch_size, batches=batches, seed=seed)
    weight = preconditioner or {n: torch.ones_like(g) for n, g in draws[0].items()}
    stacked = torch.stack([torch.cat([(g[n] * weight[n].sqrt()).reshape(-1).double() for n in g]) for g in draws])
    return float(stacked.var(dim=0).mean())


def rmsprop_preconditioner(model: torch.nn.Module, data, loss_fn, *, batch_size: int, delta: float,
                           batches: int = 32, seed: int = 0) -> dict:
    """RMSProp-SGLD's preconditioner P = 1/(√V + δ) at w*, V the mean square of minibatch gradients there (what
    its running average V_t settles to near w*, where minibatch noise is most of the gradient; from
    ``minibatch_gradients``)."""
    draws = minibatch_gradients(model, data, loss_fn, batch_size=batch_size, batches=batches, seed=seed)
    return {n: 1 / ((sum(g[n] ** 2 for g in draws) / len(draws)).sqrt() + delta) for n in draws[0]}


def trivial_loss(model: torch.nn.Module, data, loss_fn, *, examples: int = EXAMPLES) -> float:
    """The loss with every trainable weight set to zero (the trivial predictor) on the first ``examples``."""
    inputs, targets = _subset(data, examples)
    zeros = {name: torch.zeros_like(p) for name, p in model.named_parameters() if p.requires_grad}
    buffers = {name: b.detach() for name, b in model.named_buffers()}
    with torch.no_grad():
        return float(loss_fn(functional_call(model, (zeros, buffers), (inputs,)), targets))
