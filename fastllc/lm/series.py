"""λ̂ along training: every checkpoint of a causal LM, the chains of all checkpoints in as few batched runs as
the memory plan allows, then a table and a plot of λ̂ against the training step.

    series = fastllc.lm.estimate_series("runs/pythia-tiny", tokens, chains=8, steps=200, nbeta=1000.0, ...)
    print(series.table())
    series.plot("llc.png")

``checkpoints``: a directory whose entries are checkpoints (``save_pretrained`` directories, or state-dict
files ``*.pt``/``*.pth``/``*.bin`` with ``model=`` the architecture), a list of checkpoints (directories, state
dicts, files or models), or a dict {training step: checkpoint}. The training step of an entry is the last
number in its name (``checkpoint-1000``, ``step1000``, ``ckpt_3.pt``); entries are sorted by it.

How the checkpoints share one batch. A chain of checkpoint k moves w = w*_k + δ, and the batch samples δ: one
module (``SeriesModel``) holds the checkpoints' weights w*_k [K, d] and a zero δ, and evaluates a chain's
minibatch at w*_k + δ with the model's own forward (``torch.func.functional_call``). Chain j of checkpoint k
is global chain k·chains + j; its minibatch rows are those of chain j of a one-checkpoint run, offset by k·N
into the K copies of the row range (the module reads k from them), and its noise is chain j's
(``SeriesRandomness``). So each checkpoint's chains follow the trajectories of ``estimate(checkpoint_k,
tokens, ...)`` with the same seed, up to fp32 rounding (w*_k + δ is rounded where a one-checkpoint run
accumulates w), and its λ̂ is read with its own L_n(w*_k). SGLD over δ with localisation γ·δ is SGLD over
w pulled to w*_k: the same update, as δ's gradient is w's.

Memory: per chain the plan of ``memory.py`` plus the rebuilt weights w*_k + δ and their gradient (2·4·d),
shared the stacked w*_k (4·K·d); chains that do not fit run in groups one after another, keyed as above.
nβ defaults to n/log n of the N sequences (not of the K·N rows). Not with ``orthogonal`` (one ∇L_n(w*) per
checkpoint) or the published chain loss.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from .. import resources
from ..backends import sample
from ..errors import FastLLCError
from ..llc import LLCResult, estimate_llc
from ..sampling.config import wbic_nbeta
from ..sampling.contract import Samples, select_chains
from ..sampling.randomness import CounterRandomness
from ..sampling.restrict import selection_mask
from .api import _prefixed, _selection
from ..api import sgld_config
from .data import loss_at, next_token_loss, token_data
from .memory import HEADROOM, ChainOffset, MemoryPlan, chains_within, plan
from .models import CausalLM, bf16_autocast, load_causal_lm, sampling_mode
from ..validate import check_int

LOG = logging.getLogger("fastllc.lm")

STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin")
_STEP = re.compile(r"(\d+)(?!.*\d)")


@dataclass(frozen=True)
class SeriesPoint:
    """One checkpoint's λ̂: its label (file or directory name), training step (None if unknown), result."""
    label: str
    step: int | None
    result: LLCResult


class SeriesResult(list):
    """``estimate_series``'s answer: a list of ``SeriesPoint`` in training order, with a table, JSON and a plot."""

    def table(self) -> str:
        """One line per checkpoint: step, λ̂ ± standard error, split-R̂ (flagged above ``R_HAT_LIMIT``),
        healthy chains, L_n(w*)."""
        from ..calibration import R_HAT_LIMIT

        width = max([len("checkpoint")] + [len(p.label) for p in self])
        lines = [f"{'checkpoint':<{width}}  {'step':>8}  {'λ̂ ± se':>19}  {'R̂':>7}  healthy  L_n(w*)"]
        for p in self:
            r = p.result
            estimate = "—" if r.healthy_chains == 0 else f"{r.llc_mean:.4g} ± {r.llc_se:.2g}"
            flag = "!" if _unmixed(r, R_HAT_LIMIT) else " "
            r_hat = "—" if not math.isfinite(r.r_hat) else f"{r.r_hat:.3f}{flag}"
            step = "—" if p.step is None else str(p.step)
            lines.append(f"{p.label:<{width}}  {step:>8}  {estimate:>19}  {r_hat:>7}  {r.healthy_chains:>3}/{r.chains:<3}"
                         f"  {r.init_loss:.5g}")
        if any(_unmixed(p.result, R_HAT_LIMIT) for p in self):
            lines.append(f"! split-R̂ > {R_HAT_LIMIT}: the chains disagree (run longer chains, or lower ε)")
        return "\n".join(lines)

    def to_dict(self) -> list[dict]:
        return [{"label": p.label, "step": p.step, **p.result.to_dict()} for p in self]

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def plot(self, path, title: str = "") -> Path:
        """λ̂ ± standard error against the training step (checkpoint index where steps are unknown), points
        whose split-R̂ exceeds ``R_HAT_LIMIT`` marked; saved to ``path`` (PNG or any format matplotlib writes)."""
        return plot_series(self, path, title)


def _unmixed(result: LLCResult, limit: float) -> bool:
    return math.isfinite(result.r_hat) and result.r_hat > limit


def plot_series(series: SeriesResult, path, title: str = "") -> Path:
    from matplotlib.figure import Figure

    from ..calibration import R_HAT_LIMIT

    known = all(p.step is not None for p in series)
    points = [(p.step if known else i, p.result) for i, p in enumerate(series) if p.result.healthy_chains > 0]
    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    for unmixed, style in ((False, dict(fmt="o-", color="C0", label="λ̂ ± standard error")),
                           (True, dict(fmt="s", color="C3", label=f"split-R̂ > {R_HAT_LIMIT} (unmixed)"))):
        chosen = [(x, r) for x, r in points if _unmixed(r, R_HAT_LIMIT) == unmixed]
        if unmixed and not chosen:
            continue
        xs = [x for x, _ in points] if not unmixed else [x for x, _ in chosen]
        ys = [r.llc_mean for _, r in points] if not unmixed else [r.llc_mean for _, r in chosen]
        errors = [0.0 if not math.isfinite(r.llc_se) else r.llc_se for _, r in (points if not unmixed else chosen)]
        ax.errorbar(xs, ys, yerr=errors, capsize=3, markersize=5, zorder=3 if unmixed else 2, **style)
    steps = [x for x, _ in points if x > 0]
    if known and steps and max(steps) / min(steps) >= 100:
        ax.set_xscale("symlog", linthresh=min(steps))
    ax.set_xlabel("training step" if known else "checkpoint")
    ax.set_ylabel("λ̂ (local learning coefficient)")
    ax.set_title(title or f"λ̂ along training ({len(series)} checkpoints, {series[0].result.chains} chains each)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return Path(path)


# ---- checkpoints -----------------------------------------------------------------------------------------

def checkpoint_entries(checkpoints, training_steps=None) -> list[tuple[str, int | None, object]]:
    """(label, training step or None, checkpoint) in training order, from a series directory, a list or a dict
    {step: checkpoint} (module docstring); ``training_steps`` (one per checkpoint) overrides the steps."""
    if isinstance(checkpoints, (str, os.PathLike)):
        entries = _directory_entries(Path(checkpoints))
    elif isinstance(checkpoints, dict):
        entries = [(str(step), _step_of(step), item) for step, item in checkpoints.items()]
    elif isinstance(checkpoints, (list, tuple)):
        entries = [(_label(item, i), _step_of(item), item) for i, item in enumerate(checkpoints)]
    else:
        raise FastLLCError(f"checkpoints must be a directory, a list or a dict {{step: checkpoint}}, got "
                           f"{type(checkpoints).__name__}")
    if not entries:
        raise FastLLCError("no checkpoints given (an empty list, or a directory without checkpoints)")
    if training_steps is not None:
        if len(training_steps) != len(entries):
            raise FastLLCError(f"training_steps has {len(training_steps)} values for {len(entries)} checkpoints")
        entries = [(label, int(step), item) for (label, _, item), step in zip(entries, training_steps)]
    if all(step is not None for _, step, _ in entries):
        entries.sort(key=lambda e: e[1])
    return entries


def _directory_entries(folder: Path) -> list:
    if not folder.is_dir():
        raise FastLLCError(f"{os.fspath(folder)!r} is not a directory of checkpoints")
    entries = [(p.name, _step_of(p.name), p) for p in sorted(folder.iterdir())
               if (p.is_dir() and (p / "config.json").exists()) or (p.is_file() and p.suffix in STATE_DICT_SUFFIXES)]
    if not entries:
        raise FastLLCError(f"{os.fspath(folder)} holds no checkpoints: save_pretrained directories (with config.json) "
                           f"or state-dict files ({', '.join(STATE_DICT_SUFFIXES)})")
    unknown = [label for label, step, _ in entries if step is None]
    if unknown:
        raise FastLLCError(f"cannot tell the training step of {unknown[0]!r}; name checkpoints with their step "
                           "(checkpoint-1000, step1000, ckpt_3.pt)")
    return entries


def _step_of(item) -> int | None:
    if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
        return int(item)
    if isinstance(item, (str, os.PathLike)):
        match = _STEP.search(Path(item).name)
        return int(match.group(1)) if match else None
    return None


def _label(item, index: int) -> str:
    return Path(item).name if isinstance(item, (str, os.PathLike)) else f"#{index}"


def load_checkpoint(item, template: nn.Module | None) -> nn.Module:
    """A checkpoint as a causal LM: a model, a save_pretrained directory, or a state dict (or a file holding one)
    loaded into a copy of ``template``."""
    if isinstance(item, nn.Module):
        return item
    if isinstance(item, (str, os.PathLike)) and Path(item).is_dir():
        return load_causal_lm(item)
    if isinstance(item, (str, os.PathLike)):
        try:
            item = torch.load(item, map_location="cpu", weights_only=True)
        except Exception as error:  # any unreadable file: one line
            raise FastLLCError(f"cannot read a state dict from {os.fspath(item)}: {type(error).__name__}: {error}") from None
    if not isinstance(item, dict):
        raise FastLLCError(f"a checkpoint is a model, a save_pretrained directory, a state dict or a file holding one, "
                           f"not {type(item).__name__}")
    if template is None:
        raise FastLLCError("state-dict checkpoints need model= (the architecture to load them into)")
    import copy

    model = copy.deepcopy(template)
    try:
        model.load_state_dict(item, strict=True)
    except RuntimeError as error:
        raise FastLLCError(f"a checkpoint does not fit the model: {str(error).splitlines()[0]}") from None
    return model


def _flat(model: nn.Module, template: nn.Module) -> torch.Tensor:
    """The trainable weights of ``model`` in the template's order (names and shapes checked); its frozen
    weights must equal the template's (they are not sampled, and the batch evaluates the template's)."""
    ours, theirs = dict(model.named_parameters()), dict(template.named_parameters())
    if [(n, tuple(p.shape), p.requires_grad) for n, p in ours.items()] != \
            [(n, tuple(p.shape), p.requires_grad) for n, p in theirs.items()]:
        raise FastLLCError("the checkpoints differ in their parameters (names, shapes or which are trainable); a "
                           "series is one architecture at several training steps")
    if any(not p.requires_grad and not torch.equal(p.detach().cpu(), theirs[n].detach().cpu()) for n, p in ours.items()):
        raise FastLLCError("the checkpoints differ in frozen (requires_grad=False) weights, which a series does not "
                           "sample; make them trainable, or estimate each checkpoint on its own")
    return torch.cat([p.detach().reshape(-1).float().cpu() for p in ours.values() if p.requires_grad])


def _starts(entries, template, first_is_template: bool, data, init_sequences, attention, fused_gelu,
            dropout, autocast=None) -> tuple[torch.Tensor, list]:
    """w*_k [K, d] and L_n(w*_k) of every checkpoint, loaded one at a time (only the stack is kept); ``autocast``:
    L_n(w*_k) in that precision, as the chains' losses (``CausalLM``)."""
    rows, inits = [], []
    for k, (label, _, item) in enumerate(entries):
        model = template if k == 0 and first_is_template else load_checkpoint(item, template)
        rows.append(_flat(model, template))
        with sampling_mode(model, attention, fused_gelu):
            model.train(dropout)
            inits.append(loss_at(CausalLM(model, autocast=autocast), data, init_sequences))
        if not math.isfinite(inits[-1]):
            raise FastLLCError(f"checkpoint {label!r}: the loss at its weights is {inits[-1]}; check the checkpoint")
    return torch.stack(rows), inits


class SeriesModel(nn.Module):
    """All checkpoints as one module for the batch (module docstring): its one parameter δ [d] (zero at the
    start) is a chain's displacement from its checkpoint; ``forward(rows)`` evaluates rows of the K·N-row range
    (row r: sequence r mod N, checkpoint r // N, the same for a chain's whole minibatch) at w*_k + δ and gives
    the mean next-token loss. The wrapped ``CausalLM`` is held outside the module tree (its weights are not
    sampled) and moved with the module."""

    def __init__(self, lm: CausalLM, w_stars: torch.Tensor, data):
        super().__init__()
        named = [(n, p) for n, p in lm.named_parameters() if p.requires_grad]
        self.names, self.shapes = [n for n, _ in named], [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.n = len(data)
        self.delta = nn.Parameter(torch.zeros(w_stars.shape[1]))
        self.register_buffer("w_stars", w_stars, persistent=False)
        self.register_buffer("tokens", data.tokens, persistent=False)
        self.register_buffer("targets", data.targets, persistent=False)
        object.__setattr__(self, "lm", lm)

    def _apply(self, fn, recurse=True):
        self.lm._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        k = torch.div(rows[0], self.n, rounding_mode="floor").reshape(1)
        w = self.w_stars.index_select(0, k).reshape(-1) + self.delta
        local = rows - k * self.n
        params = {name: piece.view(shape) for name, piece, shape in zip(self.names, w.split(self.sizes), self.shapes)}
        return next_token_loss(functional_call(self.lm, params, (self.tokens[local],)), self.targets[local])


def _given(loss, _targets):
    return loss


class SeriesRandomness:
    """Global chain c = k·chains + j draws chain j's minibatch rows (offset by k·N: checkpoint k's copy of the
    rows) and chain j's noise from ``base``: the randomness of chain j of a one-checkpoint run."""

    def __init__(self, base, chains: int, n: int):
        self.base, self.chains, self.n = base, chains, n

    def fill(self, chains: np.ndarray, step: int, indices: np.ndarray, noise: np.ndarray, blocks=None) -> None:
        chains = np.asarray(chains, dtype=np.int64)
        self.base.fill(chains % self.chains, step, indices, noise, blocks)
        indices += (chains // self.chains * self.n)[:, None]

    def draw(self, chain: int, step: int):
        indices, noise = self.base.draw(chain % self.chains, step)
        return indices + chain // self.chains * self.n, noise


# ---- the batched run -------------------------------------------------------------------------------------

def series_plan(template: nn.Module, checkpoints: int, total: int, batch_size: int, sequences: int, length: int,
                sampler="sgld", max_memory: int | None = None) -> MemoryPlan:
    """``memory.plan`` for ``total`` chains, with a series' own bytes: w*_k + δ and its gradient per chain
    (2·4·d), the stacked w*_k shared (4·K·d)."""
    d = sum(p.numel() for p in template.parameters() if p.requires_grad)
    base = plan(template, total, batch_size, sequences, length, sampler, max_memory)
    per_chain, shared = base.chain_bytes + 8 * d, base.shared_bytes + 4 * checkpoints * d
    if not base.budget:
        return replace(base, chain_bytes=per_chain, shared_bytes=shared)
    fits = chains_within(base.budget, shared, per_chain)
    if fits < 1:
        f = resources.format_bytes
        raise FastLLCError(f"one chain needs about {f(per_chain)} and the {checkpoints} checkpoints and data "
                           f"{f(shared)}, more than {float(HEADROOM):.0%} of {f(base.budget)} ({base.budget_source}); lower batch_size, "
                           "estimate fewer checkpoints at once or raise max_memory")
    return MemoryPlan(total, int(min(total, fits)), per_chain, shared, base.budget, base.budget_source)


def _run(series: SeriesModel, config, chosen: MemoryPlan, mask, backend, device, progress, randomness) -> Samples:
    """Every chain of every checkpoint, in ``chosen.groups`` one after another (chain c keyed by c), joined."""
    needs = config.needs() + (() if mask is None else ("restrict",))
    rows = torch.arange(series.n * series.w_stars.shape[0])
    parts = []
    for lo, hi in chosen.groups:
        sub = config.chain_range(lo, hi)
        parts.append(sample(series, rows, torch.zeros(len(rows)), _given, sub, backend=backend, device=device,
                            randomness=ChainOffset(randomness, lo), progress=progress, needs=needs, restrict=mask,
                            init_loss=0.0))
    cat = lambda field: None if getattr(parts[0], field) is None else torch.cat([getattr(p, field) for p in parts])
    return Samples(cat("loss_trace"), 0.0, cat("epsilon"), cat("gamma"), cat("nbeta"), parts[0].backend,
                   parts[0].device, sum(p.seconds for p in parts), chains_in_batch=config.chains,
                   mala_acceptance=cat("mala_acceptance"))


def estimate_series(checkpoints, tokens, config=None, *, model=None, training_steps=None, loss_mask=None,
                    restrict=None, init_sequences: int | None = None, attention: str | None = "eager",
                    fused_gelu: bool = True, max_memory: int | None = None, backend: str = "generic", device="cpu",
                    dropout: bool = False, progress: bool = False, bf16: bool = False, **settings) -> SeriesResult:
    """λ̂ of every checkpoint (module docstring) on ``tokens``: ``chains`` chains each, all in as few batched
    runs as the memory plan allows; chain j of every checkpoint follows chain j of ``fastllc.lm.estimate`` on
    that checkpoint with the same settings. ``model``: the architecture that state dicts are loaded into (a
    model or a save_pretrained directory; default: the first checkpoint). Other arguments as
    ``fastllc.lm.estimate`` (``backend``: ``generic`` or ``reference``)."""
    entries = checkpoint_entries(checkpoints, training_steps)
    template = load_checkpoint(model if model is not None else entries[0][2], None)
    autocast = bf16_autocast(bf16)
    lm = CausalLM(template, autocast=autocast)
    data = token_data(tokens, loss_mask, vocab_size=lm.vocab_size)
    config = sgld_config(config, settings)
    if config.orthogonal or config.chain_loss != "exact":
        raise FastLLCError("estimate_series samples with orthogonal=False and the exact chain loss (one batch holds "
                           "every checkpoint; estimate a checkpoint alone for those)")
    if init_sequences is not None:
        check_int("init_sequences", init_sequences, minimum=1)
    config = replace(config, nbeta=wbic_nbeta(len(data)) if config.nbeta is None else config.nbeta).validate()
    w_stars, inits = _starts(entries, template, model is None, data, init_sequences, attention, fused_gelu, dropout,
                             autocast)
    mask = None if restrict is None else selection_mask(lm, _prefixed(_selection(template, restrict)))
    K, C = len(entries), config.chains
    tiled = config.tiled(K)
    chosen = series_plan(template, K, K * C, config.batch_size, len(data), data.tokens.shape[1], config.sampler,
                         max_memory)
    LOG.info("%d checkpoints: %s", K, chosen.describe())
    base = CounterRandomness(config.seed, len(data), config.batch_size, w_stars.shape[1])
    with sampling_mode(template, attention, fused_gelu):
        template.train(dropout)
        samples = _run(SeriesModel(lm, w_stars, data), tiled, chosen, mask, backend, device, progress,
                       SeriesRandomness(base, C, len(data)))
    points = []
    for k, (label, step, _) in enumerate(entries):
        own = replace(select_chains(samples, range(k * C, (k + 1) * C)), init_loss=inits[k])
        result = estimate_llc(own, config, label=f"checkpoint {label!r}")
        points.append(SeriesPoint(label, step, result if mask is None else replace(result, sampled_weights=int(mask.sum()))))
    return SeriesResult(points)


__all__ = ["estimate_series", "SeriesResult", "SeriesPoint", "SeriesModel", "SeriesRandomness", "checkpoint_entries",
           "load_checkpoint", "plot_series", "series_plan"]
