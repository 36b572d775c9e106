"""λ̂ of a causal language model in one call: ``estimate`` (all weights, or a named part) and
``estimate_groups`` (every head or layer, or any named parts, in one batched run).

Both take a Hugging Face causal LM (or a local ``save_pretrained`` directory) and token data
(``data.token_data``), run ``fastllc.estimate``/``estimate_groups`` on ``models.CausalLM`` with the
next-token loss ``data.next_token_loss`` (backend ``auto``: ``transformer``, chains folded into the batch, for the families it knows; else ``generic``, chains through ``torch.func.vmap``) inside
``models.sampling_mode`` (dropout off, vmap-batchable attention, the model's state restored afterwards),
and give L_n(w*) computed in chunks without autograd over ``init_sequences`` sequences (default: all).
nβ defaults to n/log n with n the number of sequences (``SGLDConfig``); LM studies usually set it.

Memory (``memory.py``): the chains' bytes are estimated first; when they do not fit ``max_memory`` (default:
half the available memory) the chains run in groups one after another, chain c keyed by its global index,
and the groups' traces are joined before λ̂ is read (``memory_plan`` says what was chosen; logged at INFO).
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from ..api import estimate as _estimate, estimate_groups as _estimate_groups, sgld_config
from ..backends import sample
from ..llc import GroupResults, LLCResult, estimate_llc
from ..sampling.contract import Samples, select_chains
from ..sampling.randomness import CounterRandomness
from ..sampling.restrict import selection_mask
from ..errors import FastLLCError
from ..sampling.threads import single_threaded_torch
from ..validate import check_bool, check_int
from .data import loss_at, next_token_loss, token_data
from .memory import ChainOffset, MemoryPlan, plan
from .models import (CausalLM, at_least_float32, autocast_context, bf16_autocast, load_causal_lm, sampling_mode,
                     tokens_device, vocab_size)
from .names import groups_by_name, name_mask

PREFIX = "model."  # CausalLM holds the Hugging Face model as .model: its parameters' names start so
LOG = logging.getLogger("fastllc.lm")


def _prepared(model, tokens, loss_mask, token_loss=None, bf16: bool = False):
    """(the loaded model, the module the chains run, its chain loss, the token data)."""
    model = load_causal_lm(model)
    lm, loss = language_model(model, token_loss, bf16_autocast(bf16))
    return model, lm, loss, token_data(tokens, loss_mask, vocab_size=lm.vocab_size)


def language_model(model, token_loss=None, autocast: torch.dtype | None = None) -> tuple:
    """(the module the chains run, its chain loss): ``CausalLM`` with the next-token cross-entropy, or, given the
    caller's per-token ``token_loss``, ``TokenLossLM`` with the mean of its entries."""
    if token_loss is None:
        return CausalLM(model, autocast=autocast), next_token_loss
    return TokenLossLM(model, token_loss, autocast), mean_token_loss


def init_loss_at(lm, data, init_sequences: int | None = None) -> float:
    """L_n(w*) of ``language_model``'s module over the first ``init_sequences`` sequences of ``data`` (all by
    default): the mean next-token cross-entropy over the predicted tokens, or the mean of ``token_loss``'s
    entries."""
    if init_sequences is not None:
        check_int("init_sequences", init_sequences, minimum=1)
    if isinstance(lm, TokenLossLM):
        return token_loss_at(lm, data.tokens[:init_sequences])
    return loss_at(lm, data, init_sequences)


class TokenLossLM(torch.nn.Module):
    """tokens [B, T] → ``token_loss(model, tokens)``, the caller's per-token loss [B, T−1] (devinterp 2's
    ``loss_fn``); the chain loss is the mean of its entries (``mean_token_loss``). The model is ``.model``, as in
    ``CausalLM``, so part names resolve alike."""

    def __init__(self, model: torch.nn.Module, token_loss, autocast: torch.dtype | None = None):
        super().__init__()
        if not callable(token_loss):
            raise FastLLCError(f"token_loss must be a function (model, input_ids) → per-token loss [batch, length − 1], "
                               f"got {type(token_loss).__name__}")
        self.model, self.token_loss = CausalLM(model).model, token_loss
        self.autocast = autocast  # as CausalLM's: the caller's loss under torch.autocast, its values at least fp32

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        with autocast_context(self.autocast, tokens.device.type), tokens_device(self.model, tokens):
            losses = self.token_loss(self.model, tokens)
        return at_least_float32(losses)

    @property
    def vocab_size(self):
        return vocab_size(self.model)


def mean_token_loss(losses: torch.Tensor, _targets) -> torch.Tensor:
    """The chain loss of a ``TokenLossLM``: the mean of the per-token losses (devinterp's ``loss.float().mean()``,
    float64 losses kept float64)."""
    return at_least_float32(losses).mean()


@torch.no_grad()
def token_loss_at(lm: TokenLossLM, tokens: torch.Tensor, chunk: int = 256) -> float:
    """The mean per-token loss over ``tokens`` [N, T] at the model's weights, in chunks, without autograd; the
    loss's shape checked (one line) on the first chunk."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    with single_threaded_torch():
        for lo in range(0, len(tokens), chunk):
            piece = tokens[lo:lo + chunk].to(next(lm.parameters()).device)
            losses = lm(piece)
            expected = (len(piece), tokens.shape[1] - 1)
            if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != expected:
                got = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
                raise FastLLCError(f"the per-token loss (token_loss; devinterp's loss_fn) must have shape {expected} "
                                   f"for these {len(piece)} sequences, got {got}")
            total += losses.double().sum().cpu()
            count += losses.numel()
    return float(total / count)


def _prefixed(masks: dict) -> dict:
    return {PREFIX + name: mask for name, mask in masks.items()}


def _selection(model, restrict) -> dict:
    """``restrict`` as {parameter name: bool mask}: part names (``names.name_mask``) or such a dict as given
    (checked against the model by ``selection_mask``)."""
    if isinstance(restrict, dict):
        return dict(restrict)
    return name_mask(model, restrict)


def memory_plan(model, tokens, chains: int, batch_size: int, sampler: str = "sgld",
                max_memory: int | None = None, orthogonal: bool = False) -> MemoryPlan:
    """The plan ``estimate`` follows for ``chains`` chains (``estimate_groups``: groups × chains)."""
    model = load_causal_lm(model)
    data = token_data(tokens, vocab_size=vocab_size(model))
    return plan(model, chains, batch_size, len(data), data.tokens.shape[1], sampler, max_memory, orthogonal)


def estimate(model, tokens, config=None, *, loss_mask=None, restrict=None, init_sequences: int | None = None,
             init_loss: float | None = None, attention: str | None = "eager", fused_gelu: bool = True,
             max_memory: int | None = None, backend: str = "auto", randomness=None, progress: bool = False,
             device="cpu", dropout: bool = False, token_loss=None, bf16: bool = False, **settings) -> LLCResult:
    """λ̂ of ``model`` at its weights on ``tokens`` (LongTensor [N, T], dataset with ``input_ids``, or a
    DataLoader; ``loss_mask`` [N, T] optional). ``restrict``: a part name or list (``names.py``: ``"l0h1"``,
    ``"l0 mlp"``, ``"embed"``, parameter names or globs) — only those weights move. ``init_sequences``: L_n(w*)
    over the first that many sequences (default: all); ``init_loss`` overrides it. ``max_memory``: bytes the
    chains may take (module docstring). ``restrict`` may also be a dict {parameter name: bool mask of its shape}
    (element-wise, as ``fastllc.estimate`` takes it). ``device``: where the chains run (the model is not moved).
    ``dropout=True`` evaluates the model in training mode (dropout on, masks from torch's global generator),
    L_n(w*) included, as devinterp does. ``token_loss``: a function (model, input_ids [B, T]) → per-token loss
    [B, T−1] replacing the next-token cross-entropy (devinterp 2's ``loss_fn``): the chain loss is the mean of
    its entries, L_n(w*) their mean over the sequences (``loss_mask`` does not apply). ``bf16=True``: every
    forward and backward pass under ``torch.autocast`` in bfloat16 on ``device`` (``models.CausalLM``), L_n(w*)'s
    included, so that the offset bf16 rounding puts on the loss cancels in λ̂ = nβ·(E[L_m] − L_n(w*)) — unless
    ``init_loss`` is given: a value computed without autocast (fp32) lacks that offset, and λ̂ is then off by
    nβ times it (pass an ``init_loss`` computed under bf16 autocast, or none); the weights, their gradients, the
    noise and the SGLD update stay float32 (backend ``generic``: the ``transformer`` backend's engine is
    float32). Other keywords: the ``SGLDConfig`` fields (``chains``, ``steps``, ``epsilon``,
    ``gamma``, ``nbeta``, ``batch_size`` in sequences, ...)."""
    model, lm, loss, data = _prepared(model, tokens, loss_mask, token_loss, bf16)
    config = sgld_config(config, settings)
    selection = None if restrict is None else _prefixed(_selection(model, restrict))
    chosen = plan(model, config.chains, config.batch_size, len(data), data.tokens.shape[1], config.sampler, max_memory,
                  config.orthogonal)
    LOG.info(chosen.describe())
    with sampling_mode(model, attention, fused_gelu):
        model.train(check_bool("dropout", dropout))  # sampling_mode restores every module's mode afterwards
        init = float(init_loss) if init_loss is not None else init_loss_at(lm, data, init_sequences)
        if len(chosen.groups) == 1:
            return _estimate(lm, data.pair, loss, config, backend=backend, init_loss=init,
                             restrict=selection, randomness=randomness, progress=progress, device=device)
        mask = None if selection is None else selection_mask(lm, selection)
        samples = _in_groups(lm, data, config, mask, chosen, init, backend, randomness, progress, device, loss)
    result = estimate_llc(samples, config)
    return result if mask is None else replace(result, sampled_weights=int(mask.sum()))


def estimate_groups(model, tokens, config=None, *, groups="per-head", loss_mask=None,
                    init_sequences: int | None = None, init_loss: float | None = None,
                    attention: str | None = "eager", fused_gelu: bool = True, max_memory: int | None = None,
                    device="cpu", dropout: bool = False, bf16: bool = False,
                    backend: str = "auto", randomness=None, progress: bool = False, **settings) -> GroupResults:
    """The weight-restricted λ̂ of several named parts from ONE batched run (``fastllc.estimate_groups``:
    ``chains`` chains per group, all groups' chains advancing together, or in memory-planned groups of chains
    one after another). ``groups``: ``"per-head"`` (every ``l{l}h{h}``), ``"per-layer"`` (every ``l{l}``), a list
    of names (each its own group) or a dict {group name: name or list of names}. Other arguments as
    ``estimate``."""
    model, lm, _, data = _prepared(model, tokens, loss_mask, bf16=bf16)
    config = sgld_config(config, settings)
    selections = {group: _prefixed(masks) for group, masks in groups_by_name(model, groups).items()}
    total = config.chains * len(selections)
    chosen = plan(model, total, config.batch_size, len(data), data.tokens.shape[1], config.sampler, max_memory,
                  config.orthogonal)
    LOG.info(chosen.describe())
    with sampling_mode(model, attention, fused_gelu):
        model.train(check_bool("dropout", dropout))  # sampling_mode restores every module's mode afterwards
        init = float(init_loss) if init_loss is not None else init_loss_at(lm, data, init_sequences)
        if len(chosen.groups) == 1:
            return _estimate_groups(lm, data.pair, next_token_loss, config, groups=selections, backend=backend,
                                    init_loss=init, randomness=randomness, progress=progress, device=device)
        masks = {name: selection_mask(lm, s, label=f"groups[{name!r}]") for name, s in selections.items()}
        rows = torch.stack(list(masks.values())).repeat_interleave(config.chains, dim=0)
        tiled = config.tiled(len(selections))
        samples = _in_groups(lm, data, tiled, rows, chosen, init, backend, randomness, progress, device)
    results = {}
    for g, (name, mask) in enumerate(masks.items()):
        own = select_chains(samples, range(g * config.chains, (g + 1) * config.chains))
        results[name] = replace(estimate_llc(own, config, label=f"group {name!r}"), sampled_weights=int(mask.sum()))
    return GroupResults(results)


def _in_groups(lm, data, config, mask, chosen: MemoryPlan, init, backend, randomness, progress, device="cpu",
               loss=next_token_loss) -> Samples:
    """The run's chains in ``chosen.groups`` one after another (chain c keyed by c), joined; L_n(w*) is ``init``
    (no backend makes its own pass over the data for it)."""
    d = sum(p.numel() for p in lm.parameters() if p.requires_grad)
    base = randomness if randomness is not None else CounterRandomness(config.seed, len(data), config.batch_size, d)
    needs = config.needs() + (() if mask is None else ("restrict",))
    parts = []
    for lo, hi in chosen.groups:
        sub = config.chain_range(lo, hi)
        rows = mask if mask is None or mask.dim() == 1 else mask[lo:hi]
        parts.append(sample(lm, *data.pair, loss, sub, backend=backend, randomness=ChainOffset(base, lo),
                            progress=progress, needs=needs, restrict=rows, init_loss=init, device=device))
    cat = lambda field: None if getattr(parts[0], field) is None else torch.cat([getattr(p, field) for p in parts])
    return Samples(cat("loss_trace"), init, cat("epsilon"), cat("gamma"), cat("nbeta"), parts[0].backend,
                   parts[0].device, sum(p.seconds for p in parts), final_params=cat("final_params"),
                   mala_acceptance=cat("mala_acceptance"))


__all__ = ["estimate", "estimate_groups", "memory_plan"]
