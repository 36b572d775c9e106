"""One batched run with probes: every weight restriction a chain group, the probes recorded at every draw.

``observe`` (any ``nn.Module``, its data and mean loss, probe sets and an element loss) and ``observe_lm`` (a
Hugging Face causal LM, token data and probe token sets; restrictions by ``fastllc.lm`` names: ``"l0 attn"``,
``"l1h2"``) run ``chains`` chains for each restriction, all in ONE batch on a backend with the ``observe``
capability (``generic``; ``transformer`` for the language models it runs): chain j of the g-th restriction is chain g·chains + j, moving only that restriction's
weights (``None``: all weights, the "full" run), exactly as ``fastllc.estimate_groups``. The ``Recorder`` adds
every chain's probe losses at every draw to running sums (and streams them to ``raw=`` when asked). The result,
``ObservedRun``, holds λ̂ of every restriction and the recorded observables that ``compute_susceptibilities`` and
``compute_bif`` read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ..api import sgld_config
from ..backends import backend_module, resolve_backend
from ..errors import FastLLCError
from ..llc import GroupResults, estimate_llc
from ..loaders import as_pair, is_loader, materialise
from ..sampling import resolve_device
from ..sampling.contract import Samples, select_chains
from ..sampling.randomness import CounterRandomness
from ..sampling.restrict import selection_mask
from .moments import Moments
from .recording import Draws, Probes, Recorder, make_probes

LOG = logging.getLogger("fastllc.observables")


@dataclass
class ObservedRun:
    """λ̂ per restriction (``results``) and the probes' recorded losses (``moments``; ``raw``: the draws file)."""

    results: GroupResults
    groups: dict  # {restriction: (lo, hi)} its chains in the batch
    probes: Probes
    moments: Moments
    raw: Path | None
    draws: Draws
    init_loss: float
    healthy: torch.Tensor  # [C] bool: chains λ̂ kept whose probe sums are finite
    seconds: float  # sampling wall time (the probes' evaluation included)
    observe_seconds: float  # thread-seconds spent evaluating probes

    def chains(self, restriction: str) -> torch.Tensor:
        """The healthy chains of ``restriction``: indices into the batch."""
        if restriction not in self.groups:
            raise FastLLCError(f"no restriction {restriction!r}; the run has {', '.join(map(repr, self.groups))}")
        lo, hi = self.groups[restriction]
        index = torch.arange(lo, hi)
        return index[self.healthy[lo:hi]]


def restriction_masks(model, restrictions) -> dict:
    """{name: bool mask [d]}: ``None`` is every trainable weight, anything else a selection (``estimate``'s
    ``restrict``); refused in one line before any sampling."""
    if not isinstance(restrictions, dict) or not restrictions:
        raise FastLLCError("restrictions must be a non-empty dict {name: selection or None (all weights)}")
    d = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {str(name): torch.ones(d, dtype=torch.bool) if sel is None else
            selection_mask(model, sel, label=f"restrictions[{name!r}]", fallback="drop the restriction")
            for name, sel in restrictions.items()}


def sample_groups(module, inputs, targets, loss_fn, config, masks: dict, recorder: Recorder, *, init_loss,
                  backend="auto", device="cpu", randomness=None, progress=False, parts=None) -> ObservedRun:
    """The batched run (module docstring): ``config.chains`` chains per mask, in ``parts`` (chain ranges run one
    after another, each keyed by its global chains; default one part), every chain observed by ``recorder``."""
    device = resolve_device(device)
    count, chains = len(masks), config.chains
    batch = config.tiled(count).validate()
    needs = tuple(dict.fromkeys((*config.needs(), "restrict", "observe")))
    name = resolve_backend(backend, device, module, loss_fn, needs)
    rows = torch.stack(list(masks.values())).repeat_interleave(chains, dim=0)
    parts = parts or [(0, batch.chains)]
    base = randomness if randomness is not None or len(parts) == 1 else CounterRandomness(
        batch.seed, len(targets), batch.batch_size, rows.shape[1])
    pieces = []
    try:
        for lo, hi in parts:
            sub = batch.chain_range(lo, hi)
            keyed = base if len(parts) == 1 else _offset(base, lo)
            pieces.append(backend_module(name).sample(
                module, inputs, targets, loss_fn, sub, randomness=keyed, device=device, progress=progress,
                restrict=rows[lo:hi], init_loss=init_loss, observe=recorder.at(lo)))
        moments, raw = recorder.finish()
    except BaseException:
        recorder.abort()
        raise
    return _observed(_joined(pieces), config, masks, recorder, moments, raw)


def _offset(base, lo):
    from ..lm.memory import ChainOffset
    return ChainOffset(base, lo)


def _joined(parts: list) -> Samples:
    if len(parts) == 1:
        return parts[0]
    cat = lambda field: None if getattr(parts[0], field) is None else torch.cat([getattr(p, field) for p in parts])
    return Samples(cat("loss_trace"), parts[0].init_loss, cat("epsilon"), cat("gamma"), cat("nbeta"), parts[0].backend,
                   parts[0].device, sum(p.seconds for p in parts), final_params=cat("final_params"))


def _observed(samples: Samples, config, masks: dict, recorder: Recorder, moments: Moments, raw) -> ObservedRun:
    results, healthy, bounds = {}, [], {}
    for g, (name, mask) in enumerate(masks.items()):
        own = select_chains(samples, range(g * config.chains, (g + 1) * config.chains))
        result = estimate_llc(own, config, label=f"restriction {name!r}")
        results[name] = replace(result, sampled_weights=int(mask.sum()))
        healthy += result.healthy
        bounds[name] = (g * config.chains, (g + 1) * config.chains)
    finite = torch.stack([torch.isfinite(t.reshape(len(t), -1)).all(dim=1) for t in moments.chains(slice(None)).values()]).all(0)
    healthy = torch.tensor(healthy, dtype=torch.bool) & finite
    return ObservedRun(GroupResults(results), bounds, recorder.probes, moments, raw, recorder.draws,
                       samples.init_loss, healthy, samples.seconds, recorder.seconds)


def _pair(data):
    if is_loader(data):
        data = materialise(data)
    inputs, targets = as_pair(data)
    if len(inputs) != len(targets) or len(targets) == 0:
        raise FastLLCError(f"data has {len(inputs)} inputs and {len(targets)} targets; need equal and non-zero")
    return inputs, targets


def observe(model, data, loss_fn, probes: dict, element_loss, config=None, *, restrictions=None,
            elements: int = 1, weights: dict | None = None, token_moments: bool = False, chain_mean: bool = False,
            raw=None, probe_batch: int = 32, max_memory: int | None = None, backend: str = "auto", device="cpu",
            randomness=None, progress: bool = False, init_loss: float | None = None, **settings) -> ObservedRun:
    """Every restriction's chains in one batched run of ``model`` on ``data`` (``(inputs, targets)`` or a
    DataLoader; ``loss_fn`` the mean loss the chains follow), the probe sets ``probes`` {name: (inputs, targets)}
    evaluated at every draw with ``element_loss(outputs, targets) -> [B, elements]`` (or [B]); ``weights``
    {name: [N_o, elements]} marks the elements that count. ``restrictions`` {name: selection or None} (default
    ``{"full": None}``). Settings: an ``SGLDConfig`` or its fields (``chains`` per restriction, ``steps``,
    ``burn_in``, ``thin``: draws as λ̂'s records). ``token_moments``/``chain_mean``/``raw``/``max_memory``: what
    the recorder keeps (``Recorder``)."""
    config = sgld_config(config, settings)
    inputs, targets = _pair(data)
    masks = restriction_masks(model, restrictions if restrictions is not None else {"full": None})
    recorder = Recorder(make_probes(probes, element_loss, weights, elements), Draws(config.steps, config.burn_in,
                        config.thin), {n: (g * config.chains, (g + 1) * config.chains) for g, n in enumerate(masks)},
                        token_moments=token_moments, chain_mean=chain_mean, raw=raw, probe_batch=probe_batch,
                        max_memory=max_memory)
    LOG.info("probe sums: %d bytes", recorder.bytes)
    return sample_groups(model, inputs, targets, loss_fn, config, masks, recorder, init_loss=init_loss,
                         backend=backend, device=device, randomness=randomness, progress=progress)


def per_example_squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """½‖y − ŷ‖² per example [B] (the element loss of ½·MSE regression; its mean is ``theory.dln``'s loss)."""
    return 0.5 * (outputs - targets).reshape(len(outputs), -1).pow(2).sum(dim=1)


def per_example_cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per example [B]."""
    return F.cross_entropy(outputs, targets, reduction="none")


__all__ = ["ObservedRun", "observe", "per_example_cross_entropy", "per_example_squared_error", "restriction_masks",
           "sample_groups"]
