"""The public entry points: λ̂ of any model on given data, or of a checkpoint of a fastllc run."""

from __future__ import annotations

import warnings
from dataclasses import fields, replace

import torch
import torch.nn.functional as F

from . import resources
from .loaders import as_pair, is_loader, materialise
from .errors import FastLLCError
from .llc import GroupResults, LLCResult, estimate_llc
from .model import ModularMLP
from .backends import resolve_backend, sample, sample_starts
from .sampling import SGLDConfig, resolve_device
from .sampling.contract import select_chains
from .sampling.control_variate import unavailable_reason, with_control_variate
from .sampling.restrict import group_masks, selection_mask
from .sampling.starts import Start
from .train import Run
from .validate import check_float


def estimate(model: torch.nn.Module, data, loss_fn=F.cross_entropy, config: SGLDConfig | None = None, *,
             backend: str = "auto", device="cpu", randomness=None, progress: bool = False,
             init_loss: float | None = None, restrict=None, control_variate: bool | str = False,
             **settings) -> LLCResult:
    """Estimate the LLC of ``model`` at its current weights w* on ``data``.

    ``data`` is ``(inputs, targets)`` or a DataLoader of such pairs (its dataset is materialised once and
    chains draw their own minibatches from it; its ``batch_size`` is the default minibatch size).
    ``loss_fn(outputs, targets)`` is the mean negative log-likelihood (default: cross-entropy).
    Settings are an ``SGLDConfig`` or its fields as keywords (``chains=64, steps=5000, ...``).
    ``backend="auto"`` picks the fastest backend that runs the model: the specialised ``torch``/``triton``
    ones for the study's ModularMLP with cross-entropy, ``generic`` (torch.func) for other modules, the
    ``reference`` for modules that cannot be vmapped. ``mala=True`` needs a backend that records the MALA
    acceptance (``generic``), which ``auto`` then picks. ``init_loss`` replaces L_n(w*) (default: the mean
    loss over all of ``data`` at w*). The caller's model is neither moved nor changed.

    ``restrict`` samples only some weights and keeps the others exactly at w* (the weight-restricted or
    "refined" LLC, Wang et al. 2024): parameter names, glob patterns over ``named_parameters()``
    (``"layers.1.*"``), submodules of ``model``, a dict ``{name: bool mask of the parameter's shape}``, a bool
    tensor [d] over the flat trainable weights, or a list of those (``fastllc/sampling/restrict.py``). nβ
    (default n/log n) and the health bound are unchanged; the orthogonal restriction uses ∇L_n(w*) restricted to
    the selected weights. Backends with the ``restrict`` capability run it (``auto`` picks one). Several
    restrictions in one batched run: ``estimate_groups``.

    ``control_variate=True`` reads the chains with the minibatch control variate
    (``fastllc/sampling/control_variate.py``): λ̂ = nβ·mean_t [L_B(w_t) − L_B(w*)], the same expectation with the
    data's batch-to-batch noise taken out (λ̂'s standard error 2–4× smaller on deep linear networks); refused in
    one line where it cannot apply (given randomness, the triton backend, the published chain loss, a model
    that cannot be run one example at a time). ``"auto"``: applied where it can be, else the plain estimator;
    ``result.control_variate`` says which.
    """
    if control_variate not in (True, False, "auto"):
        raise FastLLCError(f"control_variate must be True, False or 'auto', got {control_variate!r}")
    config, inputs, targets, parameters = _checked_work(model, data, config, settings, init_loss)
    mask = None if restrict is None else selection_mask(model, restrict)  # bad selections refused before any work
    _warn_if_batch_exceeds_data(config.batch_size, len(targets))
    _require_memory(config, parameters, _mlp_shape(model), len(targets), resolve_device(device))
    needs = config.needs() + (("restrict",) if mask is not None else ())  # what the backend must be able to do
    if needs:  # refused before the loss at w* is computed
        backend = resolve_backend(backend, resolve_device(device), model, loss_fn, needs)
    given = None if control_variate else init_loss  # the control variate checks its losses against L_n(w*)
    samples = sample(model, inputs, targets, loss_fn, config, backend=backend, device=device,
                     randomness=randomness, progress=progress, needs=needs, restrict=mask, init_loss=given)
    corrected = control_variate and read_with_control_variate(samples, model, inputs, targets, loss_fn, config,
                                                              randomness, required=control_variate is True)
    samples = corrected or samples
    if init_loss is not None:
        samples = replace(samples, init_loss=float(init_loss))
    result = replace(estimate_llc(samples, config), control_variate=bool(corrected))
    if mask is not None:  # the record says which λ̂ this is: of how many of the model's weights
        result = replace(result, sampled_weights=int(mask.sum()))
    return result


def read_with_control_variate(samples, model, inputs, targets, loss_fn, config, randomness, required: bool):
    """``samples`` with the control variate applied, or None where it cannot be (an error if ``required``)."""
    reason = unavailable_reason(samples, config, randomness)
    corrected = None if reason else with_control_variate(samples, model, inputs, targets, loss_fn, config)
    if corrected is None and required:
        reason = reason or "the per-example losses at w* could not be computed or do not average to L_n(w*)"
        raise FastLLCError(f"control_variate=True cannot be applied: {reason}; use control_variate='auto'")
    return corrected


def estimate_groups(model: torch.nn.Module, data, loss_fn=F.cross_entropy, config: SGLDConfig | None = None, *,
                    groups="per-module", backend: str = "auto", device="cpu", randomness=None,
                    progress: bool = False, init_loss: float | None = None, **settings) -> GroupResults:
    """The weight-restricted λ̂ of several groups of weights (per layer, per parameter, any selections) from ONE
    batched run: ``config.chains`` chains per group, each chain restricted to its group's weights (a bool mask
    [C, d], one row per chain), so C = groups × chains chains advance together.

    ``groups``: a dict ``{name: selection}`` (a selection is anything ``estimate``'s ``restrict`` takes:
    parameter names, glob patterns, submodules, ``{name: bool mask}``, a flat bool mask [d], or a list of
    those), ``"per-module"`` (one group per module holding trainable parameters itself, named as in
    ``named_modules()``: every layer of an ``nn.Sequential``) or ``"per-parameter"`` (one group per trainable
    parameter tensor, named as in ``named_parameters()``). Groups may overlap (a weight in two groups is sampled
    by both groups' chains, independently); each group's λ̂ is that of ``estimate(restrict=selection)``: nβ
    (default n/log n of the examples), the health bound, the orthogonal restriction (∇L_n(w*) masked by the
    group) and the estimator are the same, read from the group's own chains only.

    Chain j of the g-th group (in the dict's order) is chain g·chains + j of the batch, and its randomness key:
    it follows the same trajectory as chain g·chains + j of ``estimate(restrict=that group, chains=groups ×
    chains)``. Per-chain ε, γ, nβ (lists of ``chains`` values) apply to every group alike. Every selection is
    checked (one-line ``FastLLCError`` naming the group) before any sampling.

    Returns a ``GroupResults``: a dict ``{group name: LLCResult}`` (each with ``sampled_weights``) with
    ``table()`` and ``to_dict()``/``to_json()``.
    """
    config, inputs, targets, parameters = _checked_work(model, data, config, settings, init_loss)
    masks = group_masks(model, groups)  # every group checked before any work
    chains, count = config.chains, len(masks)
    batch = config.tiled(count).validate()
    _warn_if_batch_exceeds_data(config.batch_size, len(targets))
    _require_memory(batch, parameters, _mlp_shape(model), len(targets), resolve_device(device))
    needs = config.needs() + ("restrict",)
    backend = resolve_backend(backend, resolve_device(device), model, loss_fn, needs)  # before the loss at w*
    rows = torch.stack(list(masks.values())).repeat_interleave(chains, dim=0)  # group g's mask on its chains
    samples = sample(model, inputs, targets, loss_fn, batch, backend=backend, device=device,
                     randomness=randomness, progress=progress, needs=needs, restrict=rows, init_loss=init_loss)
    results = {}
    for g, (name, mask) in enumerate(masks.items()):
        own = select_chains(samples, range(g * chains, (g + 1) * chains))
        result = estimate_llc(own, config, label=f"group {name!r}")
        results[name] = replace(result, sampled_weights=int(mask.sum()))
    return GroupResults(results)


def _checked_work(model, data, config, settings, init_loss):
    """(config, inputs, targets, trainable parameter count), every cheap check of ``estimate``'s input done."""
    if is_loader(data):
        if config is None and "batch_size" not in settings and data.batch_size:
            settings["batch_size"] = data.batch_size
        data = materialise(data)
    config = sgld_config(config, settings)
    inputs, targets = as_pair(data)
    if len(inputs) != len(targets) or len(targets) == 0:
        raise FastLLCError(f"data has {len(inputs)} inputs and {len(targets)} targets; need equal and non-zero")
    parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if parameters == 0:
        raise FastLLCError("the model has no trainable parameters (none with requires_grad): nothing to sample")
    if init_loss is not None:
        check_float("init_loss", init_loss)
    return config, inputs, targets, parameters


def sgld_config(config: SGLDConfig | None, settings: dict) -> SGLDConfig:
    """``config`` (default ``SGLDConfig()``) with ``settings`` as keywords, every field type-checked: a name
    that is not a setting or a wrong type is a one-line error, not a TypeError from ``dataclasses.replace``."""
    if config is not None and not isinstance(config, SGLDConfig):
        raise FastLLCError(f"config must be an SGLDConfig or None, got {type(config).__name__}")
    known = {f.name for f in fields(SGLDConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise FastLLCError(f"{unknown[0]!r} is not an SGLD setting; known: {', '.join(sorted(known))}")
    return replace(config or SGLDConfig(), **settings).validate()


def _mlp_shape(model) -> tuple[int, int, int] | None:
    """(p, e, h) of the study's MLP, whose memory ``resources`` knows in detail; None for other models."""
    return (model.p, model.embed_dim, model.hidden_dim) if isinstance(model, ModularMLP) else None


def _warn_if_batch_exceeds_data(batch_size: int, n: int) -> None:
    """Minibatches are drawn with replacement, so this works, but it is rarely what was meant."""
    if batch_size > n:
        warnings.warn(f"batch size {batch_size} is larger than the {n} training examples; minibatches repeat "
                      "examples", RuntimeWarning, stacklevel=3)


def _require_memory(config: SGLDConfig, parameters: int, mlp: tuple[int, int, int] | None, examples: int,
                    device: torch.device) -> None:
    """Refuse, before any work, chains that cannot fit (``resources.require_sampling_memory``, the formula the
    commands use too). For the study's MLP (``mlp`` = (p, e, h)) its minibatch buffers and the full-batch
    loss and gradient at w* over the ``examples`` are counted; other models' are not known."""
    minibatch, start, words = 0, 0, None
    if mlp is not None:
        minibatch = resources.mlp_minibatch_bytes(*mlp, config.batch_size)
        start = resources.full_batch_bytes(*mlp, examples, backward=True)
        words = (f"{examples:,} examples", "sampling (the loss and gradient at w* over all of them)",
                 "use fewer examples")
    resources.require_sampling_memory(config.chains, config.steps, parameters, minibatch, device, start_bytes=start,
                                      start=words)


def estimate_run(run: Run | str, checkpoint: int | None = None, config: SGLDConfig | None = None,
                 **kwargs) -> LLCResult:
    """λ̂ of checkpoint ``checkpoint`` (default: final) of a training run, on its train split."""
    run = run if isinstance(run, Run) else Run.load(run)
    model = run.load_model(checkpoint)
    return estimate(model, run.task().train_data(), F.cross_entropy, config, **kwargs)


def estimate_run_groups(run: Run | str, checkpoint: int | None = None, config: SGLDConfig | None = None,
                        groups="per-parameter", **kwargs) -> GroupResults:
    """``estimate_groups`` at checkpoint ``checkpoint`` (default: final) of a training run, on its train split
    (default: one group per parameter tensor of the study's MLP)."""
    run = run if isinstance(run, Run) else Run.load(run)
    model = run.load_model(checkpoint)
    return estimate_groups(model, run.task().train_data(), F.cross_entropy, config, groups=groups, **kwargs)


def estimate_checkpoints(run: Run | str, checkpoints: list[int] | None = None, config: SGLDConfig | None = None, *,
                         backend: str = "auto", device="cpu", randomness=None, progress: bool = False,
                         **settings) -> list[LLCResult]:
    """λ̂ at several checkpoints of a run (default: all), every checkpoint's chains in one batched run
    (on a backend that stacks starting points: ``torch``, or ``triton`` on CUDA).

    Chain j of the k-th listed checkpoint is global chain k·chains + j of the batch (its randomness key).
    """
    run = run if isinstance(run, Run) else Run.load(run)
    config = sgld_config(config, settings)
    if checkpoints is not None and not isinstance(checkpoints, (list, tuple, range)):
        raise FastLLCError(f"checkpoints must be a list of checkpoint indices or None, got {checkpoints!r}")
    indices = range(len(run.steps)) if checkpoints is None else [run.checkpoint_index(k) for k in checkpoints]
    if not indices:
        raise FastLLCError("estimate_checkpoints needs at least one checkpoint, got an empty list")
    pairs, labels = run.task().train_data()
    device = resolve_device(device)
    _warn_if_batch_exceeds_data(config.batch_size, len(labels))
    arch = (run.config.p, run.config.embed, run.config.hidden)
    _require_memory(replace(config, chains=config.chains * len(indices)), resources.mlp_parameters(*arch), arch,
                    len(labels), device)
    starts = [Start(run.load_model(k), pairs, labels) for k in indices]
    name = resolve_backend(backend, device, starts[0].model, F.cross_entropy, needs=("stacked_starts",))
    samples = sample_starts(starts, config, backend=name, randomness=randomness, device=device, progress=progress)
    return [estimate_llc(s, config) for s in samples]
