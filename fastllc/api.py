"""The public entry points: λ̂ of any model on given data, or of a checkpoint of a fastllc run."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from .compat.loaders import as_pair, is_loader, materialise
from .errors import FastLLCError
from .llc import LLCResult, estimate_llc
from .sampling import SGLDConfig, backend_module, batched, resolve_backend, resolve_device, sample, vectorized
from .train import Run


def estimate(model: torch.nn.Module, data, loss_fn=F.cross_entropy, config: SGLDConfig | None = None, *,
             backend: str = "auto", device="cpu", randomness=None, progress: bool = False,
             init_loss: float | None = None, **settings) -> LLCResult:
    """Estimate the LLC of ``model`` at its current weights w* on ``data``.

    ``data`` is ``(inputs, targets)`` or a DataLoader of such pairs (its dataset is materialised once and
    chains draw their own minibatches from it; its ``batch_size`` is the default minibatch size).
    ``loss_fn(outputs, targets)`` is the mean negative log-likelihood (default: cross-entropy).
    Settings are an ``SGLDConfig`` or its fields as keywords (``chains=64, steps=5000, ...``).
    ``backend="auto"`` picks the fastest backend that runs the model: the specialised ``torch``/``triton``
    ones for the study's ModularMLP with cross-entropy, ``generic`` (torch.func) for other modules, the
    ``reference`` for modules that cannot be vmapped. ``mala=True`` needs ``generic``, which ``auto`` then
    picks. ``init_loss`` replaces L_n(w*) (default: the mean loss over all of ``data`` at w*).
    """
    if is_loader(data):
        if config is None and "batch_size" not in settings and data.batch_size:
            settings["batch_size"] = data.batch_size
        data = materialise(data)
    config = replace(config or SGLDConfig(), **settings).validate()
    inputs, targets = as_pair(data)
    if len(inputs) != len(targets) or len(targets) == 0:
        raise FastLLCError(f"data has {len(inputs)} inputs and {len(targets)} targets; need equal and non-zero")
    if config.mala:
        backend = _mala_backend(backend, model, loss_fn, resolve_device(device))
    samples = sample(model, inputs, targets, loss_fn, config, backend=backend, device=device,
                     randomness=randomness, progress=progress)
    if init_loss is not None:
        samples = replace(samples, init_loss=float(init_loss))
    return estimate_llc(samples, config)


def _mala_backend(backend: str, model, loss_fn, device) -> str:
    """The MALA acceptance rate is computed by the generic backend only."""
    if backend == "generic" or (backend == "auto" and vectorized.supports(model, loss_fn, device)):
        return "generic"
    raise FastLLCError("mala=True (the MALA acceptance rate) needs backend 'generic', which "
                       + ("cannot vmap this model" if backend == "auto" else f"is not the chosen {backend!r}"))


def estimate_run(run: Run | str, checkpoint: int | None = None, config: SGLDConfig | None = None,
                 **kwargs) -> LLCResult:
    """λ̂ of checkpoint ``checkpoint`` (default: final) of a training run, on its train split."""
    run = run if isinstance(run, Run) else Run.load(run)
    model = run.load_model(checkpoint)
    return estimate(model, run.task().train_data(), F.cross_entropy, config, **kwargs)


def estimate_checkpoints(run: Run | str, checkpoints: list[int] | None = None, config: SGLDConfig | None = None, *,
                         backend: str = "auto", device="cpu", randomness=None, progress: bool = False,
                         **settings) -> list[LLCResult]:
    """λ̂ at several checkpoints of a run (default: all), every checkpoint's chains in one batched run
    (backend ``torch``, or ``triton`` on CUDA: the two that stack starting points).

    Chain j of the k-th listed checkpoint is global chain k·chains + j of the batch (its randomness key).
    """
    run = run if isinstance(run, Run) else Run.load(run)
    config = replace(config or SGLDConfig(), **settings).validate()
    indices = range(len(run.steps)) if checkpoints is None else [run.checkpoint_index(k) for k in checkpoints]
    pairs, labels = run.task().train_data()
    starts = [batched.Start(run.load_model(k), pairs, labels) for k in indices]
    device = resolve_device(device)
    name = resolve_backend(backend, device, starts[0].model, F.cross_entropy)
    if name not in ("torch", "triton"):
        raise FastLLCError(f"estimate_checkpoints runs all checkpoints as one batch: backend torch or triton, not {name!r}")
    samples = backend_module(name).sample_starts(starts, config, randomness=randomness, device=device,
                                                 progress=progress)
    return [estimate_llc(s, config) for s in samples]
