"""devinterp 1.3.2's LLC entry points on fastllc: switching a study over is a one-line import change::

    # from devinterp.slt.sampler import estimate_learning_coeff_with_summary
    from fastllc.compat.devinterp import estimate_learning_coeff_with_summary

Same arguments, same result keys (``llc/mean``, ``llc/std``, ``llc-chain/{i}``, ``loss/trace`` [chains,
draws]; with ``online=True`` ``llc/means``, ``llc/stds``, ``llc/trace``; with a ``MalaAcceptanceRate``
callback ``mala_accept/trace|mean|std``), same SGLD update (Δw = −(lr/2)(localization·(w − w*) + nβ·∇L_m)
+ N(0, lr)), the same RMSprop-SGLD (``sampling_method=SGMCMC.rmsprop_sgld`` with its ``alpha`` and ``eps``:
``SGLDConfig(sampler="rmsprop_sgld")``, whose docstring states the update), the same defaults (lr 0.01, localization 0, nβ = b/log b with b the loader's batch size ×
``grad_accum_steps``) and the same draws (the loss at w_t, before the step, at steps burn-in + k − 1,
burn-in + 2k − 1, ... with k = ``num_steps_bw_draws``). All chains run at once (backend ``auto``: the
specialised path for the study's MLP, else ``generic``, else the reference). ``optimize_over_per_model_param`` ({name: bool mask} for every parameter) is fastllc's weight-restricted
sampling (``estimate(restrict=...)``, backends generic and reference): only the True weights move, the others
stay at w* (devinterp masks the whole update alike); unlike devinterp, a mask for a name the model lacks, of
the wrong shape or not 0/1, or masks selecting nothing, are refused. Extra keys: ``llc/se``,
``llc/r_hat``, ``llc/ess``, ``llc/healthy_chains``, ``init_loss``, ``nbeta``, ``fastllc``.

Differences from devinterp 1.3.2, all deliberate:
- Minibatches: each chain draws its own, with replacement, from the loader's dataset (materialised once,
  see ``fastllc/loaders.py``), by counter-based randomness; devinterp cycles through the loader in its order.
  Sampler, shuffling and ``drop_last`` of the loader are ignored. Same distribution of L_m per step.
- Randomness: ``seed`` keys fastllc's counter-based streams (chain c's noise does not depend on how
  many chains run); draws differ from devinterp's ``torch.manual_seed`` streams, so results agree in
  distribution, not draw for draw. ``seed=None`` takes a seed from torch's global generator; a list of
  per-chain seeds is refused. Dropout masks (if any) come from torch's global generator.
- init_loss (when not given): the mean loss over the whole dataset at w* (evaluated in the model's
  training mode, as devinterp's sampler does), not the mean over the first ``num_chains`` batches of the
  loader: a deterministic L_n(w*), without the sampling error that devinterp's estimate adds to λ̂.
- Diverging chains (loss NaN/inf or 100× above the start) are flagged, excluded from ``llc/mean`` and
  ``llc/std`` and reported as NaN in ``llc-chain/{i}`` with a warning; devinterp raises on NaN.
- MALA: the acceptance of the single SGLD step ending at each draw after the first, computed on the
  device with both ends' minibatches (devinterp leaves the first entry of its trace at 0 and, with
  ``num_steps_bw_draws`` > 1, treats several steps as one proposal).
- The model is left in the training mode it had (devinterp leaves it in ``train()``); ``cores``,
  ``gpu_idxs`` and ``use_amp`` are ignored (one process, float32). Not supported (refused with a message):
  samplers other than SGLD (``SGLD``, ``SGMCMC.sgld``) and RMSprop-SGLD (``SGMCMC.rmsprop_sgld``), e.g.
  ``SGNHT`` or ``SGMCMC`` itself, ``noise_level`` ≠ 1, ``weight_decay``, ``bounding_box_size``,
  ``add_grad_correction``, callbacks other than ``MalaAcceptanceRate``, and
  ``MalaAcceptanceRate`` with RMSprop-SGLD (its formula is plain SGLD's proposal).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..api import estimate
from ..errors import FastLLCError
from ..sampling import SGLDConfig
from ..sampling.restrict import selection_mask
from ..loaders import materialise

_IGNORED_KWARGS = {"metrics", "save_noise", "save_mala_vars", "noise_norm", "grad_norm", "weight_norm", "distance"}
# devinterp SGLD options fastllc does not implement, and the values that mean "off" (anything else is refused)
_REFUSED_KWARGS = {"noise_level": (1.0,), "weight_decay": (0.0, None), "bounding_box_size": (None, 0.0),
                   "optimize_over": (None,)}
# devinterp's sampling_method, matched by name (the SGLD class, or SGMCMC's factory methods), as fastllc's
# sampler, with what each adds to SGLD's optimizer_kwargs: fastllc's name for it (or None: refused unless off)
_SAMPLING_METHODS = {"SGLD": ("sgld", {}), "sgld": ("sgld", {}),
                     "rmsprop_sgld": ("rmsprop_sgld", {"alpha": "rmsprop_alpha", "eps": "rmsprop_eps",
                                                       "add_grad_correction": None})}
_SAMPLER_LABELS = {"sgld": "SGLD", "rmsprop_sgld": "RMSprop-SGLD"}


class SGLD:
    """Stands in for ``devinterp.optim.sgld.SGLD`` where devinterp is not installed: scripts pass the class
    as ``sampling_method=SGLD`` and fastllc matches samplers by name, so this is the same choice."""


class SGMCMC:
    """Stands in for ``devinterp.optim.SGMCMC`` where devinterp is not installed: ``sampling_method=SGMCMC.sgld``
    or ``SGMCMC.rmsprop_sgld`` (matched by name, as devinterp's own are; fastllc never calls them)."""

    @classmethod
    def sgld(cls, params, **optimizer_kwargs):
        raise FastLLCError("fastllc.compat.devinterp.SGMCMC.sgld only names a sampler: pass it as sampling_method")

    @classmethod
    def rmsprop_sgld(cls, params, **optimizer_kwargs):
        raise FastLLCError("fastllc.compat.devinterp.SGMCMC.rmsprop_sgld only names a sampler: pass it as "
                           "sampling_method")


def default_nbeta(batch_size: int) -> float:
    """devinterp's default (and name): b/log b for the loader's batch size b (1 when b ≤ 1). fastllc's own
    default is ``sampling.wbic_nbeta(n)``, n/log n of the training examples."""
    return 1.0 if batch_size <= 1 else batch_size / math.log(batch_size)


def split_results(results):
    """The loss from what ``evaluate`` returns: a tensor, a tuple (loss first), a dict or an object with .loss."""
    if isinstance(results, dict):
        return results["loss"]
    if isinstance(results, tuple):
        return results[0]
    if isinstance(results, torch.Tensor):
        return results
    if hasattr(results, "loss"):
        return results.loss
    raise FastLLCError("evaluate must return a loss tensor, a tuple (loss, ...), a dict with 'loss' or an object "
                       "with a .loss attribute")


def _default_evaluate(model, data):  # devinterp's: the model returns its own loss
    return model(data)


class EvaluateLoss(nn.Module):
    """``evaluate(model, batch)`` as a module whose input is row indices into the materialised dataset.

    Its parameters are the model's (prefixed ``model.``, same order), so every backend runs it through
    ``functional_call`` unchanged, and under vmap each chain gathers its own rows.
    """

    def __init__(self, model: nn.Module, evaluate, data):
        super().__init__()
        self.model, self.evaluate = model, evaluate
        leaves, self.structure = tree_flatten(data)
        for i, leaf in enumerate(leaves):
            self.register_buffer(f"data_{i}", leaf, persistent=False)
        self.leaves = len(leaves)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        batch = tree_unflatten([getattr(self, f"data_{i}")[rows] for i in range(self.leaves)], self.structure)
        return split_results(self.evaluate(self.model, batch))


def loss_as_given(loss, _targets):
    return loss


def _criterion(evaluate):
    """The criterion of devinterp's ``make_evaluate(criterion)`` / ``evaluate_ce``, which fastllc runs natively."""
    if (isinstance(evaluate, functools.partial) and getattr(evaluate.func, "__module__", None) == "devinterp.utils"
            and evaluate.func.__name__ == "evaluate" and len(evaluate.args) == 1 and not evaluate.keywords):
        return evaluate.args[0]
    return None


def _restriction(model: nn.Module, masks) -> dict | None:
    """devinterp's ``optimize_over_per_model_param`` ({name: bool mask of the parameter's shape}, one for every
    parameter: True where it may move) as fastllc's ``restrict`` dict, checked against ``model`` (messages in
    devinterp's name). Empty or None: every weight moves, as in devinterp."""
    if not masks:
        return None
    if not isinstance(masks, dict):
        raise FastLLCError(f"optimize_over_per_model_param must be a dict {{parameter name: bool mask of its shape}}, "
                           f"not {type(masks).__name__}")
    trainable = {}
    for name, parameter in model.named_parameters():
        if name not in masks:  # devinterp looks every parameter up (a KeyError there)
            raise FastLLCError(f"optimize_over_per_model_param has no mask for parameter {name!r}; give one for every "
                               "parameter of the model (all False to keep it fixed)")
        if parameter.requires_grad:  # fastllc samples trainable parameters only: frozen ones stay where they are
            trainable[name] = masks[name]
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    try:
        unknown = {name: mask for name, mask in masks.items() if name not in trainable and name not in frozen}
        selection_mask(model, {**trainable, **unknown})  # an unknown name is refused there, with the closest ones
    except FastLLCError as error:  # restrict's message, in the words of devinterp's argument
        raise FastLLCError(str(error).replace("restrict", "optimize_over_per_model_param")) from None
    return trainable


def _settings(optimizer_kwargs, sampling_method, callbacks, batch_size, grad_accum_steps):
    kwargs = dict(optimizer_kwargs or {})
    if "temperature" in kwargs:
        if "nbeta" in kwargs:
            raise FastLLCError("set either nbeta or temperature (deprecated) in optimizer_kwargs, not both")
        kwargs["nbeta"] = kwargs.pop("temperature")
    name = "SGLD" if sampling_method is None else getattr(sampling_method, "__name__", None)
    if name not in _SAMPLING_METHODS:
        raise FastLLCError(f"fastllc implements sampling_method SGLD, SGMCMC.sgld and SGMCMC.rmsprop_sgld only, "
                           f"not {name or sampling_method!r}")
    sampler, extra = _SAMPLING_METHODS[name]
    refused = {**_REFUSED_KWARGS, **{key: (False, None) for key, ours in extra.items() if ours is None}}
    for key, neutral in refused.items():
        if key in kwargs and not any(kwargs[key] is v or kwargs[key] == v for v in neutral):
            raise FastLLCError(f"optimizer_kwargs {key}={kwargs[key]!r} is not supported by fastllc")
    unknown = set(kwargs) - _IGNORED_KWARGS - set(refused) - set(extra) - {"lr", "localization", "nbeta"}
    if unknown:
        raise FastLLCError(f"unknown optimizer_kwargs for {_SAMPLER_LABELS[sampler]}: {', '.join(sorted(unknown))}")
    options = {ours: kwargs[key] for key, ours in extra.items() if ours is not None and key in kwargs}
    mala = False
    for callback in callbacks or []:
        kind = type(callback).__name__
        if kind == "MalaAcceptanceRate":
            if sampler != "sgld":
                raise FastLLCError(f"MalaAcceptanceRate is not supported with {_SAMPLER_LABELS[sampler]} by fastllc "
                                   "(the acceptance is that of plain SGLD's proposal); drop the callback or use SGLD")
            mala = True
        elif kind not in ("LLCEstimator", "OnlineLLCEstimator"):
            raise FastLLCError(f"callback {kind} is not supported by fastllc (only MalaAcceptanceRate)")
    b = batch_size * grad_accum_steps
    nbeta = kwargs.get("nbeta", default_nbeta(b))
    for callback in callbacks or []:
        if type(callback).__name__ == "MalaAcceptanceRate":  # fastllc computes MALA with the sampler's settings
            own = dict(learning_rate=kwargs.get("lr", 0.01), nbeta=nbeta)
            for name, value in own.items():
                theirs = getattr(callback, name, value)
                if theirs is not None and not math.isclose(float(theirs), float(value), rel_tol=1e-9):
                    raise FastLLCError(f"MalaAcceptanceRate has {name}={theirs}, the sampler {value}: "
                                       "fastllc computes the acceptance rate with the sampler's; make them equal")
    return dict(epsilon=kwargs.get("lr", 0.01), gamma=kwargs.get("localization", 0.0), nbeta=nbeta,
                batch_size=b, mala=mala, sampler=sampler, **options)


def estimate_learning_coeff_with_summary(
        model: nn.Module, loader, callbacks=(), evaluate=None, sampling_method=None, optimizer_kwargs=None,
        num_draws: int = 100, num_chains: int = 10, num_burnin_steps: int = 0, num_steps_bw_draws: int = 1,
        init_loss: float | None = None, grad_accum_steps: int = 1, cores=1, seed=None, device="cpu",
        gpu_idxs=None, verbose: bool = True, optimize_over_per_model_param=None, online: bool = False,
        use_amp: bool = False, *, backend: str = "auto") -> dict:
    """devinterp's ``estimate_learning_coeff_with_summary`` on fastllc (see the module docstring)."""
    if not loader.batch_size:
        raise FastLLCError("the DataLoader must have a batch_size (the minibatch size of every chain)")
    settings = _settings(optimizer_kwargs, sampling_method, callbacks, loader.batch_size, grad_accum_steps)
    restrict = _restriction(model, optimize_over_per_model_param)
    if seed is None:
        seed = int(torch.randint(2**31, ()))
    elif not isinstance(seed, (int, np.integer)):
        raise FastLLCError("fastllc takes one int seed (its chains have counter-based streams), not a list")
    config = SGLDConfig(chains=num_chains, steps=num_burnin_steps + num_draws * num_steps_bw_draws,
                        burn_in=num_burnin_steps, thin=num_steps_bw_draws, seed=int(seed), **settings)
    data = materialise(loader)
    criterion = _criterion(evaluate)
    if criterion is not None:
        target, inputs, targets, loss_fn = model, data[0], data[1], criterion
    else:
        target = EvaluateLoss(model, evaluate or _default_evaluate, data)
        if restrict is not None:  # the wrapper's parameters are the model's, prefixed
            restrict = {f"model.{name}": mask for name, mask in restrict.items()}
        n = len(tree_flatten(data)[0][0])
        inputs, targets, loss_fn = torch.arange(n), torch.zeros(n), loss_as_given
    was_training = model.training
    model.train()  # devinterp evaluates the sampled models in training mode
    try:
        result = estimate(target, (inputs, targets), loss_fn, config, backend=backend, device=device,
                          progress=verbose, init_loss=init_loss, restrict=restrict)
    finally:
        model.train(was_training)
    out = summary(result, config, online)
    for callback in callbacks or []:  # as devinterp leaves them: the callback objects hold their results too
        if type(callback).__name__ == "MalaAcceptanceRate" and "mala_accept/trace" in out:
            callback.mala_acceptance_rate = torch.as_tensor(out["mala_accept/trace"])
    return out


def summary(result, config: SGLDConfig, online: bool = False) -> dict:
    """devinterp's result keys (and fastllc's extra diagnostics) from an ``LLCResult``."""
    draws = result.loss_trace[:, config.burn_in + config.thin - 1 :: config.thin]
    per_chain = [math.nan if v is None else v for v in result.llc_per_chain]
    nbeta = torch.as_tensor(result.nbeta, dtype=torch.float64).reshape(-1, 1)
    out = {"llc/mean": result.llc_mean, "llc/std": result.llc_std,
           **{f"llc-chain/{i}": v for i, v in enumerate(per_chain)},
           "loss/trace": draws.float().numpy(),
           "llc/se": result.llc_se, "llc/r_hat": result.r_hat, "llc/ess": result.ess,
           "llc/healthy_chains": result.healthy_chains, "init_loss": result.init_loss, "nbeta": result.nbeta,
           "fastllc": result}
    if online:
        llcs = (nbeta * (draws - result.init_loss)).float()
        out.update({"llc/means": llcs.mean(dim=0).numpy(), "llc/stds": llcs.std(dim=0).numpy(),
                    "llc/trace": llcs.numpy()})
    if result.mala_trace is not None:
        ends = torch.arange(config.burn_in + config.thin - 1, config.steps, config.thin)[1:]  # draw steps after the first
        trace = result.mala_trace[:, ends - 1].float().numpy()  # the step into each of them
        healthy = trace[np.asarray(result.healthy, bool)]  # as llc/mean: unhealthy chains left out
        out.update({"mala_accept/trace": trace, "mala_accept/mean": float(np.mean(healthy)),
                    "mala_accept/std": float(np.std(healthy))})
    return out


def estimate_learning_coeff(model: nn.Module, loader, callbacks=(), evaluate=None, sampling_method=None,
                            optimizer_kwargs=None, num_draws: int = 100, num_chains: int = 10,
                            num_burnin_steps: int = 0, num_steps_bw_draws: int = 1, init_loss: float | None = None,
                            grad_accum_steps: int = 1, cores=1, seed=None, device="cpu", verbose: bool = True,
                            optimize_over_per_model_param=None, *, backend: str = "auto") -> float:
    """devinterp's ``estimate_learning_coeff``: the ``llc/mean`` of the summary."""
    return estimate_learning_coeff_with_summary(
        model, loader, callbacks=callbacks, evaluate=evaluate, sampling_method=sampling_method,
        optimizer_kwargs=optimizer_kwargs, num_draws=num_draws, num_chains=num_chains,
        num_burnin_steps=num_burnin_steps, num_steps_bw_draws=num_steps_bw_draws, init_loss=init_loss,
        grad_accum_steps=grad_accum_steps, seed=seed, device=device, verbose=verbose,
        optimize_over_per_model_param=optimize_over_per_model_param, backend=backend)["llc/mean"]


__all__ = ["SGLD", "SGMCMC", "estimate_learning_coeff", "estimate_learning_coeff_with_summary", "default_nbeta", "summary"]
