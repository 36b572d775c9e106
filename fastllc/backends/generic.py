"""Backend ``generic``: any ``nn.Module`` and loss, all chains at once through ``torch.func``.

Every chain's weights live in one flat parameter-major buffer W (``sampling/layout.py``, ``named_parameters``
order: parameter j is a contiguous [C, *shape] view). One step evaluates ``vmap(grad_and_value(L))`` over
those views and each chain's own minibatch (``functional_call`` puts chain c's weights into the model),
then applies the sampler's batched update (``sampling/samplers/``), as the ``torch`` backend does; the
counter-based noise is written straight into the same layout. Buffers (e.g. BatchNorm statistics in eval mode) are shared by all chains.

Why the step is traced. ``vmap(grad(...))`` re-enters functorch's Python layers for every operation;
for small models that overhead, not arithmetic, bounds the rate. The first step is therefore run
eagerly, then recorded once with ``make_fx`` into a graph of plain batched ATen operations, and the graph
is replayed by TorchScript's interpreter (``torch.jit.trace`` of the graph: no Python per operation),
or by FX where TorchScript cannot hold it. Measured per step on the study's MLP at C=16, one thread:
eager 5.2 ms, FX replay 3.5 ms, TorchScript replay 1.8 ms. A replay is kept only if it reproduces the
eager step bit for bit; otherwise (random operations such as dropout, Python side effects) every step
stays eager. Runs shorter than 500 steps are not traced (it would not pay); ``trace=True/False`` forces.

On the CPU the chains run in groups, one per core, each in its own thread (with its own shallow copy of
the module tree) and with single-threaded torch ops, at every chain count and model size
(``sampling/threads.py``).

Modules that cannot be vmapped (BatchNorm or InstanceNorm updating running statistics in training mode,
other in-place buffer updates, data-dependent control flow) raise ``FastLLCError`` naming the module and
pointing to ``backend="reference"``, which runs the same chains one at a time. ``supports`` refuses the
known cases up front, so ``auto`` sends them to the reference.

``config.mala`` also records the Metropolis-adjusted (MALA) acceptance probability of every step, as
devinterp's ``MalaAcceptanceRate`` defines it: potential U = nβ·L_m + γ/2·‖w − w*‖² with its gradient at
both ends of the step, each end on its own minibatch (the orthogonal restriction is not accounted for).

Every sampler runs here through its own batched update; the traced replay covers the gradient step, which
is the same for all of them.

``restrict`` (a bool mask [d] over the flat weights, ``sampling/restrict.py``, or [C, d] with one row per
chain) samples only the selected weights: every step zeroes ∇L_m on the others (so drift, RMSProp's V and
MALA's ∇U live in the restricted space) and then copies w* back into them, so that they stay at w* bit for bit
whatever rounding the in-place update does ((1 − decay)·w* + decay·w* need not be w*); the orthogonal direction is
∇L_n(w*) masked by the chain's row.

``observe`` (an object, ``fastllc/observables/recording.py``) is called at the draws it asks for
(``observe.due(t)``) with each group's chain indices, its own module copy, the parameter names and the chains'
weight views at w_t (before step t's update): ``observe(t, ids, model, names, weights)``; it evaluates its probes
for all those chains at once (vmap over ``functional_call``). ``observe.begin(chains, steps, device)`` comes
first. Without it the loop is unchanged.
"""

from __future__ import annotations

import copy
import functools
import math
import threading
import warnings

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from ..errors import FastLLCError
from ..sampling.config import SGLDConfig
from ..sampling.contract import Samples, chain_loss_fn, nan_from_first_non_finite
from ..sampling.chains import ChainWeights, chain_rows, prepare_model_run
from ..sampling.layout import StepDraws, axpy
from ..sampling.threads import chain_groups, min_chains_per_group, run_groups_timed

NAME = "generic"
CAPABILITIES = frozenset({"mala", "samplers", "restrict", "published_chain_loss", "observe"})
DEVICES = ("cpu", "cuda")
AUTO_PRIORITY = 30  # ``auto`` tries lower first: any vmappable module


_FIRST_STEP = threading.Lock()
_TRACE_FROM_STEPS = 500  # tracing costs ~0.3 s and saves ~1 ms a step on small models: worth it from here


def _blocking_module(model: nn.Module) -> tuple[str, str] | None:
    """(name, reason) of a submodule known to defeat vmap, or None."""
    for name, module in model.named_modules():
        if (isinstance(module, nn.modules.batchnorm._NormBase) and module.training
                and module.track_running_stats):
            return name, (f"{type(module).__name__} in training mode updates its running "
                                                   "statistics in place, once for all chains")
    return None


def supports(model, loss_fn, device=None) -> bool:
    """Any module with trainable parameters, unless a submodule is known not to vmap (see the docstring)."""
    if model is None:  # the study's MLP
        return True
    return (isinstance(model, nn.Module) and any(p.requires_grad for p in model.parameters())
            and _blocking_module(model) is None)


def require(device, model=None, loss_fn=None) -> None:
    """The one-line reason this backend cannot run ``model`` (when given), else nothing."""
    if model is None:
        return
    if not isinstance(model, nn.Module) or not any(p.requires_grad for p in model.parameters()):
        raise FastLLCError("the generic backend runs an nn.Module with trainable parameters")
    blocked = _blocking_module(model)
    if blocked:
        raise _vmap_error(*blocked, model)


def _vmap_error(name: str | None, reason: str, model: nn.Module) -> FastLLCError:
    """The one message for every vmap failure: which module, why, and the fallback."""
    if name is None:
        where = "the loss function or the backward pass"  # the failure came after every module's forward
    else:
        where = f"module '{name or '(the model itself)'}' ({type(model.get_submodule(name)).__name__})"
    return FastLLCError(
        f"the generic backend cannot evaluate {where} for all chains at once with torch.func.vmap: {reason}. "
        "Use backend='reference' (the same SGLD chains, one at a time), or make the module vmappable "
        "(e.g. BatchNorm in eval mode)")


def _failing_module(model: nn.Module, call) -> str | None:
    """Rerun ``call`` with hooks that track the module being evaluated; the innermost one when it fails."""
    stack, handles = [], []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(lambda *_, name=name: stack.append(name)))
        handles.append(module.register_forward_hook(lambda *_: stack.pop()))
    try:
        call()
    except Exception:  # the failure we are locating
        return stack[-1] if stack else None
    finally:
        for handle in handles:
            handle.remove()
    return None


class _Mala:
    """MALA acceptance probability of each step t → t+1 (see the module docstring), float64 [C, T−1]."""

    def __init__(self, chains: ChainWeights, steps: int):
        self.chains, self.previous = chains, None
        self.acceptance = torch.full((chains.C, max(steps - 1, 0)), math.nan, dtype=torch.float64)
        device = chains.W.device
        self.eps, self.nbeta, self.gamma = (v.to(device) for v in (chains.epsilon, chains.nbeta, chains.gamma))
        self.nbeta_c, self.gamma_c, self.half_eps = (chains.coefficient(v, device) for v in (chains.nbeta, chains.gamma,
                                                                                              chains.epsilon / 2))

    def observe(self, t: int, loss: torch.Tensor, displacement: torch.Tensor) -> None:
        """At w_t, given L_m(w_t) [C], ∇L_m(w_t) in ``chains.G`` and w_t − w* (parameter-major)."""
        ch = self.chains
        potential = self.nbeta * loss.double() + self.gamma / 2 * ch.chain_sum(displacement * displacement)
        grad_u = axpy(ch.G * self.nbeta_c, displacement, self.gamma_c)  # ∇U = nβ∇L_m + γ(w − w*)
        state = (ch.W.clone(), grad_u, potential)
        if self.previous is not None:
            w0, g0, u0 = self.previous
            step = state[0] - w0
            forward = axpy(step.clone(), g0, self.half_eps)  # Δ + (ε/2)∇U(w_{t−1})
            backward = axpy(step.neg_(), grad_u, self.half_eps)  # −Δ + (ε/2)∇U(w_t)
            log_ratio = (ch.chain_sum(forward * forward) - ch.chain_sum(backward * backward)) / (2 * self.eps)
            log_alpha = (u0 - potential + log_ratio).clamp(max=0.0)
            self.acceptance[:, t - 1] = log_alpha.exp().cpu()
        self.previous = state


def _step_function(model: nn.Module, loss_fn, names: list[str]):
    """(params tuple of [C, *shape], inputs [C, m, ...], targets [C, m, ...]) → (∇L_m per parameter, L_m [C])."""
    def loss(params, x, y):
        return loss_fn(functional_call(model, dict(zip(names, params)), (x,)), y)
    return vmap(grad_and_value(loss), randomness="different")


def _trace(step, args, eager_result):
    """``step`` as a recorded graph of batched ATen operations (run by TorchScript's interpreter if it can,
    else by FX), provided its replays equal the eager result bit for bit; None otherwise."""
    try:
        from torch.fx.experimental.proxy_tensor import make_fx
        graph = make_fx(step)(*args)
    except Exception:  # any tracing limitation: stay eager
        return None
    candidates = [graph]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            candidates.insert(0, torch.jit.trace(graph, args, check_trace=False))
    except Exception:  # TorchScript cannot hold it: FX replay
        pass
    expected = torch.utils._pytree.tree_leaves(eager_result)
    for candidate in candidates:
        try:  # three replays: TorchScript's profiling executor settles on its plan after the first calls
            if all(all(torch.equal(a, b) for a, b in zip(torch.utils._pytree.tree_leaves(candidate(*args)), expected))
                   for _ in range(3)):
                return candidate
        except Exception:
            continue
    return None


def _run_group(ids: np.ndarray, model, loss_fn, names, shapes, w_star, hyper, direction, inputs, targets,
               config: SGLDConfig, randomness, device, trace: bool, tick, moves=None, observe=None):
    """SGLD for the chains ``ids``: (loss trace [T, C], final weights [C, d] chain-major, MALA or None)."""
    C, d, m, T = len(ids), w_star.numel(), config.batch_size, config.steps
    chains = ChainWeights(w_star.to(device).expand(C, d), shapes, *(v[ids] for v in hyper), config.sampler_object(),
                           device)
    if moves is not None:
        chains.restrict(chain_rows(moves, ids))
    projection = None
    if direction is not None:
        direction = chain_rows(direction, ids).to(device).expand(C, d)
        projection = (chains.rows(chains.G), chains.rows(chains.to_parameter_major(direction)))
    mala = _Mala(chains, T) if config.mala else None
    draws = StepDraws(C, m, d, device)
    losses = torch.empty(T, C, device=device)
    step = _step_function(model, loss_fn, names)
    report_every = max(1, T // 100)
    for t in range(T):
        indices, noise = draws.draw(randomness, ids, t, chains.blocks)
        flat = indices.view(-1)
        args = (chains.weights, inputs.index_select(0, flat).view(C, m, *inputs.shape[1:]),
                targets.index_select(0, flat).view(C, m, *targets.shape[1:]))
        if t == 0:
            with _FIRST_STEP:  # functorch and make_fx keep global state: one group at a time
                try:
                    grads, loss = step(*args)
                except Exception as error:  # locate the module that vmap could not handle, then explain
                    name = _failing_module(model, lambda: step(*args))
                    raise _vmap_error(name, f"{type(error).__name__}: {(str(error).splitlines() or [repr(error)])[0]}",
                                      model) from error
                if trace:
                    step = _trace(step, args, (grads, loss)) or step
        else:
            grads, loss = step(*args)
        losses[t] = loss.detach()
        if observe is not None and observe.due(t):  # the chains' weights are w_t until chains.step below
            observe(t, ids, model, names, chains.weights)
        torch.cat([g.reshape(-1) for g in grads], out=chains.G)
        if chains.frozen is not None:  # ∇L_m in the restricted space, before MALA or the update reads it
            chains.frozen.zero(chains.G)
        if mala is not None:
            mala.observe(t, losses[t], chains.W - chains.W_star)
        chains.step(noise, projection)
        if (t + 1) % report_every == 0:
            tick(C * report_every)
    return losses.cpu(), chains.to_chain_major(chains.W).cpu(), None if mala is None else mala.acceptance


def _private_copy(model: nn.Module) -> nn.Module | None:
    """The module tree copied, sharing every parameter and buffer tensor: ``functional_call`` swaps weights
    on module objects, so concurrent groups need their own (None if the model cannot be copied)."""
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    try:
        return copy.deepcopy(model, memo=shared)
    except Exception:  # an attribute that cannot be copied: the caller runs one group
        return None


def sample(model, inputs, targets, loss_fn, config: SGLDConfig, *, randomness=None, device="cpu",
           progress: bool = False, trace: bool | None = None, workers: int | None = None,
           restrict: torch.Tensor | None = None, init_loss: float | None = None, observe=None) -> Samples:
    """``init_loss``: L_n(w*) when the caller knows it (no pass over the data is made for it; ∇L_n(w*) only
    under the orthogonal restriction). ``observe``: called at its draws (module docstring)."""
    config.validate()
    device = torch.device(device)
    require(device, model, loss_fn)
    model, inputs, targets, hyper, names, shapes, w_star, init_loss, moves, direction, randomness = prepare_model_run(
        model, inputs, targets, loss_fn, config, restrict=restrict, init_loss=init_loss, randomness=randomness,
        device=device)
    C, T, d = config.chains, config.steps, w_star.numel()
    if observe is not None:
        observe.begin(C, T, device)

    trace = T >= _TRACE_FROM_STEPS if trace is None else trace
    groups = chain_groups(C, device, min_per_group=min_chains_per_group(d), groups=workers or None)  # workers: tests
    run = functools.partial(_run_group, loss_fn=chain_loss_fn(loss_fn, config), names=names, shapes=shapes,
                            w_star=w_star, hyper=hyper, direction=direction, inputs=inputs, targets=targets, config=config,
                            randomness=randomness, device=device, trace=trace, moves=moves, observe=observe)
    models = [model] + [_private_copy(model) for _ in groups[1:]]
    if any(copy_ is None for copy_ in models):
        groups, models = [(0, C)], [model]
    model_of = dict(zip(groups, models))
    results, seconds = run_groups_timed(
        lambda lo, hi, tick: run(np.arange(lo, hi, dtype=np.int64), model=model_of[lo, hi], tick=tick),
        groups, total=C * T, desc=f"SGLD (generic, {C} chains)", progress=progress)

    losses = nan_from_first_non_finite(torch.cat([r[0] for r in results], dim=1).T.double())
    mala = torch.cat([r[2] for r in results]) if config.mala else None
    return Samples(losses, init_loss, *hyper, NAME, str(device), seconds, torch.cat([r[1] for r in results]),
                   mala_acceptance=mala)
