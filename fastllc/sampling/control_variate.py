"""Minibatch noise taken out of the recorded losses: a control variate whose mean is known exactly.

A chain records L_{B_t}(w_t), the mean loss over its minibatch B_t at step t. Most of its fluctuation from step
to step is the data's, not the chain's: at w* itself L_{B_t}(w*) varies with standard deviation σ_ℓ/√m (σ_ℓ the
spread of the per-example losses), which nβ (~10³) turns into tens of units of λ̂ per draw and which hides
slow trends from every diagnostic computed on the trace (split-R̂, ESS, drift). Subtracting
L_{B_t}(w*) − L_n(w*), whose expectation over the draw of B_t (m examples uniformly, with replacement) is exactly
zero, keeps the estimator unbiased and removes that noise:

    λ̂ = nβ · mean_t [L_{B_t}(w_t) − L_{B_t}(w*)],   corrected trace_t = L_{B_t}(w_t) − L_{B_t}(w*) + L_n(w*).

It needs only the per-example losses at w* (one pass over the data) and the minibatch indices, which
``CounterRandomness`` (the randomness of every backend that draws on the CPU) regenerates from the seed.
Measured on a deep linear network (n = 20,000, m = 500, 4 chains × 3,000 steps): the trace's standard deviation
16× smaller, λ̂'s standard error 3.4× smaller (0.71 → 0.21 at λ = 7).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.func import functional_call, vmap

from .randomness import _fill_indices

CHUNK = 4096  # examples per vmapped evaluation


def per_example_losses(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn) -> np.ndarray:
    """ℓ_i(w*) = loss_fn on example i alone, for every example, as float64 [n] (``loss_fn`` a mean over examples)."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b.detach() for name, b in model.named_buffers()}

    def one(x, y):
        return loss_fn(functional_call(model, (params, buffers), (x.unsqueeze(0),)), y.unsqueeze(0))

    with torch.no_grad():
        parts = [vmap(one)(inputs[lo:lo + CHUNK], targets[lo:lo + CHUNK]) for lo in range(0, len(targets), CHUNK)]
    return torch.cat(parts).double().cpu().numpy()


def minibatch_baseline(per_example: np.ndarray, seed: int, chains: int, steps: int, batch_size: int) -> np.ndarray:
    """L_{B_{c,t}}(w*) [chains, steps]: the mean of ``per_example`` over the minibatch ``CounterRandomness(seed)``
    gives chain c at step t (chains 0 .. chains−1 of the batch)."""
    ids = np.arange(chains, dtype=np.int64)
    indices = np.empty((chains, batch_size), np.int64)
    baseline = np.empty((chains, steps))
    for t in range(steps):
        _fill_indices(seed, ids, t, len(per_example), indices)
        baseline[:, t] = per_example[indices].mean(axis=1)
    return baseline


def corrected_trace(trace: np.ndarray, per_example: np.ndarray, seed: int, batch_size: int) -> np.ndarray:
    """``trace`` [C, T] of L_{B_t}(w_t) with L_{B_t}(w*) − L_n(w*) subtracted (the module's control variate)."""
    chains, steps = trace.shape
    return trace - minibatch_baseline(per_example, seed, chains, steps, batch_size) + per_example.mean()


def unavailable_reason(samples, config, randomness) -> str | None:
    """Why the control variate cannot be applied to this run (None: it can): it needs the minibatch indices,
    which only ``CounterRandomness`` keyed by ``config.seed`` regenerates, and the recorded loss to be
    ``loss_fn`` itself."""
    if randomness is not None:
        return "the randomness was given (only the default counter-based minibatches can be regenerated)"
    if samples.backend == "triton":
        return "the triton backend draws its minibatches inside its kernel"
    if config.chain_loss != "exact":
        return f"the chains record the {config.chain_loss} chain loss, not loss_fn"
    return None


def with_control_variate(samples, model, inputs: torch.Tensor, targets: torch.Tensor, loss_fn, config):
    """``samples`` with its loss trace corrected (``corrected_trace``), or None where the per-example losses
    cannot be computed (a model ``vmap`` cannot run one example at a time) or do not average to L_n(w*) (a
    ``loss_fn`` that is not a mean over examples)."""
    from dataclasses import replace

    home = next(model.parameters()).device
    try:
        per_example = per_example_losses(model, inputs.to(home), targets.to(home), loss_fn)
    except Exception:  # torch.func cannot run this model one example at a time: no correction
        return None
    if not abs(per_example.mean() - samples.init_loss) <= 1e-5 * max(1.0, abs(samples.init_loss)):
        return None
    trace = corrected_trace(samples.loss_trace.double().cpu().numpy(), per_example, config.seed, config.batch_size)
    return replace(samples, loss_trace=torch.from_numpy(trace))
