"""λ̂ of a causal language model in one call: ``estimate`` (all weights, or a named part) and
``estimate_groups`` (every head or layer, or any named parts, in one batched run).

Both take a Hugging Face causal LM (or a local ``save_pretrained`` directory) and token data
(``data.token_data``), run ``fastllc.estimate``/``estimate_groups`` on ``models.CausalLM`` with the
next-token loss ``data.next_token_loss`` (backend ``generic``: all chains through ``torch.func.vmap``) inside
``models.sampling_mode`` (dropout off, vmap-batchable attention, the model's state restored afterwards),
and give L_n(w*) computed in chunks without autograd over ``init_sequences`` sequences (default: all).
nβ defaults to n/log n with n the number of sequences (``SGLDConfig``); LM studies usually set it.
"""

from __future__ import annotations


from ..api import estimate as _estimate, estimate_groups as _estimate_groups
from ..errors import FastLLCError
from ..llc import GroupResults, LLCResult
from ..validate import check_int
from .data import loss_at, next_token_loss, token_data
from .models import CausalLM, load_causal_lm, sampling_mode
from .names import groups_by_name, name_mask

PREFIX = "model."  # CausalLM holds the Hugging Face model as .model: its parameters' names start so


def _prepared(model, tokens, loss_mask):
    model = load_causal_lm(model)
    lm = CausalLM(model)
    return model, lm, token_data(tokens, loss_mask, vocab_size=lm.vocab_size)


def _init_loss(lm, data, init_sequences):
    if init_sequences is not None:
        check_int("init_sequences", init_sequences, minimum=1)
    return loss_at(lm, data, init_sequences)


def _prefixed(masks: dict) -> dict:
    return {PREFIX + name: mask for name, mask in masks.items()}


def estimate(model, tokens, config=None, *, loss_mask=None, restrict=None, init_sequences: int | None = None,
             init_loss: float | None = None, attention: str | None = "eager", fused_gelu: bool = True,
             backend: str = "generic", **settings) -> LLCResult:
    """λ̂ of ``model`` at its weights on ``tokens`` (LongTensor [N, T], dataset with ``input_ids``, or a
    DataLoader; ``loss_mask`` [N, T] optional). ``restrict``: a part name or list (``names.py``: ``"l0h1"``,
    ``"l0 mlp"``, ``"embed"``, parameter names or globs) — only those weights move. ``init_sequences``: L_n(w*)
    over the first that many sequences (default: all); ``init_loss`` overrides it. Other keywords: the
    ``SGLDConfig`` fields (``chains``, ``steps``, ``epsilon``, ``gamma``, ``nbeta``, ``batch_size`` in
    sequences, ...) and ``fastllc.estimate``'s (``randomness``, ``progress``, ``device``)."""
    model, lm, data = _prepared(model, tokens, loss_mask)
    selection = None if restrict is None else _prefixed(name_mask(model, restrict))
    with sampling_mode(model, attention, fused_gelu):
        init = float(init_loss) if init_loss is not None else _init_loss(lm, data, init_sequences)
        return _estimate(lm, data.pair, next_token_loss, config, backend=backend, init_loss=init,
                         restrict=selection, **settings)


def estimate_groups(model, tokens, config=None, *, groups="per-head", loss_mask=None,
                    init_sequences: int | None = None, init_loss: float | None = None,
                    attention: str | None = "eager", fused_gelu: bool = True, backend: str = "generic",
                    **settings) -> GroupResults:
    """The weight-restricted λ̂ of several named parts from ONE batched run (``fastllc.estimate_groups``:
    ``chains`` chains per group, all groups' chains advancing together). ``groups``: ``"per-head"`` (every
    ``l{l}h{h}``), ``"per-layer"`` (every ``l{l}``), a list of names (each its own group) or a dict
    {group name: name or list of names}. Other arguments as ``estimate``."""
    model, lm, data = _prepared(model, tokens, loss_mask)
    selections = {group: _prefixed(masks) for group, masks in groups_by_name(model, groups).items()}
    with sampling_mode(model, attention, fused_gelu):
        init = float(init_loss) if init_loss is not None else _init_loss(lm, data, init_sequences)
        return _estimate_groups(lm, data.pair, next_token_loss, config, groups=selections, backend=backend,
                                init_loss=init, **settings)


__all__ = ["estimate", "estimate_groups", "FastLLCError"]
