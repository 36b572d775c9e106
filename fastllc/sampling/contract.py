"""What every sampling backend returns (``Samples``), and the plumbing each one uses: the start of every
run (loss and gradient at w*), the flat weights, the NaN rule, the caller's model left where it is.

A backend's ``sample(model, inputs, targets, loss_fn, config, *, randomness=None, device="cpu",
progress=False) -> Samples`` runs ``config.chains`` SGLD chains from the model's weights w* and records
L_m(w_t) at every step (the whole contract: ``fastllc/backends/__init__.py``). ``loss_fn(outputs, targets)``
must return the *mean* loss over the examples given (a negative log-likelihood up to a constant, e.g.
F.cross_entropy), as the estimator assumes.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..errors import FastLLCError
from .config import PUBLISHED_LOSS_OFFSET, SGLDConfig
from .threads import single_threaded_torch


@dataclass
class Samples:
    """Per-chain loss traces and the settings that produced them; turned into λ̂ by ``fastllc.llc``."""

    loss_trace: torch.Tensor  # [C, T] float64 on CPU: L_m(w_t) for t = 0 .. steps-1 (NaN after a blow-up)
    init_loss: float  # L_n(w*), mean loss over all given examples
    epsilon: torch.Tensor  # [C] float64
    gamma: torch.Tensor  # [C] float64
    nbeta: torch.Tensor  # [C] float64
    backend: str
    device: str
    seconds: float  # wall time of the chains, excluding setup
    final_params: torch.Tensor | None = None  # [C, d] flat weights after the last step, canonical order
    chains_in_batch: int | None = None  # chains advanced together in ``seconds`` (several starts: more than C)
    mala_acceptance: torch.Tensor | None = None  # [C, T−1] float64: MALA acceptance of step t → t+1 (config.mala)


def nan_from_first_non_finite(trace: torch.Tensor) -> torch.Tensor:
    """``trace`` [C, T] with every record from a chain's first non-finite loss on set to NaN, in place: a
    diverged chain stays diverged (the reference stops it there; the batched backends keep computing)."""
    trace[(~torch.isfinite(trace)).cumsum(dim=1) > 0] = math.nan
    return trace


def on_device(model: torch.nn.Module, device) -> torch.nn.Module:
    """``model`` itself when its parameters and buffers already live on ``device``, else a copy moved there:
    sampling never moves or mutates the caller's model (``nn.Module.to`` moves in place)."""
    device = torch.device(device)
    def here(t):
        return t.device.type == device.type and (device.index is None or t.device.index == device.index)
    if all(here(t) for t in (*model.parameters(), *model.buffers())):
        return model
    return copy.deepcopy(model).to(device)


def select_chains(samples: Samples, chains) -> Samples:
    """The same run restricted to some chains (e.g. one cell of a calibration grid)."""
    index = torch.as_tensor(chains, dtype=torch.long)
    finals = None if samples.final_params is None else samples.final_params[index]
    mala = None if samples.mala_acceptance is None else samples.mala_acceptance[index]
    return Samples(samples.loss_trace[index], samples.init_loss, samples.epsilon[index], samples.gamma[index],
                   samples.nbeta[index], samples.backend, samples.device, samples.seconds, finals,
                   samples.chains_in_batch or len(samples.loss_trace), mala)


def flat_parameters(model: torch.nn.Module) -> tuple[list[str], list[torch.Size], torch.Tensor]:
    """(names, shapes, flat copy of all trainable parameters) in ``named_parameters`` order."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    flat = torch.cat([p.detach().reshape(-1) for _, p in named]).float()
    return [n for n, _ in named], [p.shape for _, p in named], flat


def unflatten(flat: torch.Tensor, names: list[str], shapes: list[torch.Size]) -> dict[str, torch.Tensor]:
    """Views of ``flat`` (a [d] vector) shaped as the named parameters."""
    params, offset = {}, 0
    for name, shape in zip(names, shapes):
        size = shape.numel()
        params[name] = flat[offset : offset + size].view(shape)
        offset += size
    return params


def private_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the model's buffers, to pass to ``functional_call`` beside the weights: a forward pass in
    training mode (BatchNorm's running statistics) then updates these, never the caller's model. What the
    forward pass returns does not depend on them in training mode, so no number changes."""
    return {name: b.clone() for name, b in model.named_buffers()}


def loss_and_gradient_at_start(model, inputs, targets, loss_fn) -> tuple[float, torch.Tensor]:
    """L_n(w*) and ∇L_n(w*) (flat, [d]) over all given examples, by autograd; the model is left as it was.
    On the CPU with one torch thread: a multi-threaded reduction rounds differently with the thread count,
    and λ̂ must not depend on the machine's core count (a sweep on a Ray worker equals one run locally)."""
    if inputs.device.type == "cpu":
        with single_threaded_torch():
            return _loss_and_gradient(model, inputs, targets, loss_fn)
    return _loss_and_gradient(model, inputs, targets, loss_fn)


def start_of_run(model, inputs, targets, loss_fn, *, gradient: bool, init_loss: float | None = None
                 ) -> tuple[float, torch.Tensor | None]:
    """(L_n(w*), ∇L_n(w*) or None) as a run needs them: the gradient only when asked (the orthogonal
    restriction), the loss pass only when the caller does not know L_n(w*) already (``init_loss``: e.g. a
    language model's over a stated number of sequences). A pass over all the data can cost as much as
    the chains: none is made that nothing reads."""
    if gradient:
        loss, grad = loss_and_gradient_at_start(model, inputs, targets, loss_fn)
        return (loss if init_loss is None else float(init_loss)), grad
    if init_loss is not None:
        return float(init_loss), None
    one_thread = single_threaded_torch() if inputs.device.type == "cpu" else contextlib.nullcontext()
    with torch.no_grad(), one_thread:
        names, shapes, w_star = flat_parameters(model)
        weights = {**unflatten(w_star, names, shapes), **private_buffers(model)}
        return _checked_loss_at_start(loss_fn(functional_call(model, weights, (inputs,)), targets)), None


def _loss_and_gradient(model, inputs, targets, loss_fn) -> tuple[float, torch.Tensor]:
    names, shapes, w_star = flat_parameters(model)
    w = w_star.clone().requires_grad_(True)
    weights = {**unflatten(w, names, shapes), **private_buffers(model)}
    loss = loss_fn(functional_call(model, weights, (inputs,)), targets)
    value = _checked_loss_at_start(loss)
    (grad,) = torch.autograd.grad(loss, w)
    return value, grad.detach()


def _checked_loss_at_start(loss) -> float:
    """L_n(w*) as a float, or a one-line error: every backend starts here, so a loss that is not one number
    or not finite is refused before any chain runs (it would make every chain look diverged)."""
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise FastLLCError(f"loss_fn must return the mean loss over the examples (one number), got {shape}")
    value = loss.item()
    if not math.isfinite(value):
        raise FastLLCError(f"the loss at w* is {value} (the starting weights or data give a non-finite loss); "
                           "check the model and data")
    return value


def published_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The published study's chain loss −mean log(softmax(z)_y + δ), δ = ``PUBLISHED_LOSS_OFFSET``.
    p_y comes from log_softmax (exact where softmax underflows), and is then offset as the study did."""
    p_y = torch.log_softmax(logits, dim=-1).gather(-1, targets.reshape(-1, 1)).exp()
    return -(p_y + PUBLISHED_LOSS_OFFSET).log().mean()


def is_cross_entropy(loss_fn) -> bool:
    """Is ``loss_fn`` plain mean cross-entropy on logits (``F.cross_entropy``, or ``nn.CrossEntropyLoss()``
    without weights, label smoothing or another reduction)?"""
    if loss_fn is F.cross_entropy:
        return True
    return (isinstance(loss_fn, torch.nn.CrossEntropyLoss) and loss_fn.weight is None
            and loss_fn.reduction == "mean" and loss_fn.label_smoothing == 0)


def chain_loss_fn(loss_fn, config: SGLDConfig):
    """The loss the chains record and follow (``SGLDConfig.chain_loss``); L_n(w*) always uses ``loss_fn``."""
    if config.chain_loss == "exact":
        return loss_fn
    if not is_cross_entropy(loss_fn):
        raise FastLLCError("chain_loss='published' is the study's −log(softmax(z)_y + 1e-6): it needs "
                           "loss_fn=F.cross_entropy (plain mean cross-entropy); use chain_loss='exact'")
    return published_cross_entropy


def orthogonal_direction(gradient: torch.Tensor) -> torch.Tensor | None:
    """g = ∇L_n(w*)/‖∇L_n(w*)‖, or None when the gradient is exactly zero (nothing to restrict)."""
    norm = gradient.double().norm()
    if norm == 0 or not torch.isfinite(norm):
        return None
    return (gradient.double() / norm).float()
