"""Causal language models as the module fastllc samples: tokens [B, T] → next-token logits [B, T−1, V].

``CausalLM`` wraps a Hugging Face ``transformers`` causal LM (built from a config, or loaded from a local
``save_pretrained`` directory: ``load_causal_lm``) or a TransformerLens ``HookedTransformer`` (recognised as
devinterp 2 recognises one, by its ``cfg.n_heads``; TransformerLens is never imported here); its parameters are
the wrapped model's own (no copy), named ``model.<the model's own name>``.

``autocast`` (``CausalLM(model, autocast=torch.bfloat16)``, what ``estimate(..., bf16=True)`` sets): the forward
runs under ``torch.autocast`` in that dtype on the tokens' device (matrix products in bf16, the reductions autocast
keeps in fp32), the logits come back as fp32 (``at_least_float32``: a ``.double()`` model's stay float64); the
weights stay fp32 and so do their gradients (autocast casts a copy of each weight for the product, and autograd
casts the gradient back), the noise and the SGLD update, which the backends do outside the module.
``sampling_mode`` puts the model in the state the chains need and restores it afterwards, whatever happens:

- ``eval()`` on every module (dropout off: L_m is a function of the weights and the minibatch only), the
  training flag of each module restored afterwards;
- attention ``"eager"`` (``config._attn_implementation``), restored afterwards. Why: the chains are
  evaluated under ``torch.func.vmap``, which has no batching rule for the CPU scaled-dot-product kernel
  (``aten::_scaled_dot_product_flash_attention_for_cpu``) and falls back to a Python loop over chains; the
  eager path is matmul + softmax, which vmap batches (one bmm over all chains);
- ``fused_gelu``: GPT-2's ``NewGELUActivation`` (tanh-GELU spelt as seven element-wise ops) replaced by
  ``F.gelu(approximate="tanh")``, one fused kernel, the same function to fp32 rounding (|Δ| ≲ 1e-6
  relative; tested). The element-wise ops were ~45% of a tiny GPT-2's step on the CPU. TransformerLens's
  ``gelu_new`` (the same seven ops, a function in each MLP's ``act_fn``) is swapped likewise.

A HookedTransformer moves its input and its residual stream to ``cfg.device`` in every forward; the chains run
on their own ``device`` (the weights copied there, the model not moved), so each forward of ``CausalLM`` and
``TokenLossLM`` sets ``cfg.device`` to the tokens' device and restores it (``tokens_device``).
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import FastLLCError
from ..validate import check_bool


class CausalLM(nn.Module):
    """tokens [B, T] (int64) → logits [B, T−1, V] of the wrapped Hugging Face causal LM (position t predicts
    token t+1; the last position predicts nothing in the data and is dropped).

    A batch of more than ``chunk`` sequences (the backends' pass over all the data for L_n(w*) and ∇L_n(w*))
    runs ``chunk`` sequences at a time, each under activation checkpointing when autograd records it: the
    backward pass recomputes one chunk's activations at a time, so that pass holds one chunk's activations
    instead of all N sequences' (GBs for 8,192 sequences of a tiny GPT-2), for one extra forward. Minibatches
    (≤ ``chunk`` sequences per chain) run in one piece. Chunking changes no value: each sequence's logits
    do not depend on the others in its batch."""

    def __init__(self, model: nn.Module, chunk: int = 512, autocast: torch.dtype | None = None):
        super().__init__()
        if not (is_hf_causal_lm(model) or is_hooked_transformer(model)):
            raise FastLLCError(f"fastllc.lm runs a Hugging Face transformers causal LM (a PreTrainedModel with a "
                               f"language-model head), a TransformerLens HookedTransformer or a local save_pretrained "
                               f"directory, got {type(model).__name__}")
        if autocast not in (None, torch.bfloat16, torch.float16):
            raise FastLLCError(f"autocast is None, torch.bfloat16 or torch.float16, got {autocast!r}")
        self.model = model
        self.chunk = chunk
        self.autocast = autocast
        self._hooked = is_hooked_transformer(model)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[0] <= self.chunk:
            return self._logits(tokens)
        pieces = tokens.split(self.chunk)
        if torch.is_grad_enabled():
            return torch.cat([checkpoint(self._logits, piece, use_reentrant=False) for piece in pieces])
        return torch.cat([self._logits(piece) for piece in pieces])

    def _logits(self, tokens: torch.Tensor) -> torch.Tensor:
        with autocast_context(self.autocast, tokens.device.type), tokens_device(self.model, tokens):
            if self._hooked:
                logits = self.model(tokens, return_type="logits")
            else:
                logits = self.model(input_ids=tokens, use_cache=False).logits
        return at_least_float32(logits[:, :-1])

    @property
    def vocab_size(self) -> int | None:
        return vocab_size(self.model)


def autocast_context(dtype: torch.dtype | None, device_type: str):
    """``torch.autocast`` in ``dtype`` on ``device_type``; a context that changes nothing when ``dtype`` is None."""
    return torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def bf16_autocast(bf16) -> torch.dtype | None:
    """The autocast dtype of ``bf16=`` (``estimate``, ``estimate_series``): torch.bfloat16 or None."""
    return torch.bfloat16 if check_bool("bf16", bf16) else None


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """A module's output as the chains read it: float32 if it came out in a narrower type (bf16/fp16 under
    autocast, or from a half-precision model), float64 if it is float64 (a ``.double()`` model keeps its
    precision in L_m and L_n(w*)); no copy when it already is."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


@contextlib.contextmanager
def tokens_device(model: nn.Module, tokens: torch.Tensor):
    """A HookedTransformer's ``cfg.device`` set to the device of ``tokens`` (where the chains' weights are) for
    one forward, restored afterwards; nothing for other models. TransformerLens moves the tokens and, before
    every block, the residual stream to ``cfg.device``: a model built on the CPU whose chains run on CUDA would
    otherwise compute on two devices."""
    config = getattr(model, "cfg", None) if is_hooked_transformer(model) else None
    if config is None:
        yield
        return
    previous = config.device
    config.device = str(tokens.device)
    try:
        yield
    finally:
        config.device = previous


def is_hf_causal_lm(model) -> bool:
    """A transformers model with a language-model head (a bare ``GPT2Model`` has no logits to read)."""
    return (isinstance(model, nn.Module) and hasattr(model, "config") and hasattr(model, "get_output_embeddings")
            and model.get_output_embeddings() is not None)


def is_hooked_transformer(model) -> bool:
    """A TransformerLens ``HookedTransformer`` (devinterp 2's test: a ``cfg`` with ``n_heads``), without importing
    TransformerLens."""
    return isinstance(model, nn.Module) and hasattr(getattr(model, "cfg", None), "n_heads")


def vocab_size(model) -> int | None:
    """The vocabulary of a Hugging Face model (``config.vocab_size``) or a HookedTransformer (``cfg.d_vocab``)."""
    if is_hooked_transformer(model):
        return getattr(model.cfg, "d_vocab", None)
    return getattr(getattr(model, "config", None), "vocab_size", None)


class Dimensions(NamedTuple):
    """A transformer's sizes, read from a Hugging Face ``config`` or a HookedTransformer's ``cfg`` (the first
    five are what the memory plan reads, in its order)."""
    layers: int
    width: int  # d_model
    heads: int
    mlp_width: int  # the MLP's hidden units (4·width when the config does not say)
    vocab: int
    head_width: int  # d_head (``head_dim`` when the config has one, else width // heads)
    kv_heads: int  # key-value heads (= heads without grouped-query attention)


def dimensions(model) -> Dimensions:
    """The model's ``Dimensions``; a size its config does not give is 1 (the MLP width 4·width, the head width
    width // heads, the key-value heads the heads), so that an estimate from shapes still has numbers."""
    if is_hooked_transformer(model):
        c = model.cfg
        kv = getattr(c, "n_key_value_heads", None) or c.n_heads
        return Dimensions(c.n_layers, c.d_model, c.n_heads, c.d_mlp or 4 * c.d_model, c.d_vocab, c.d_head, kv)
    c = getattr(model, "config", None)
    width = getattr(c, "hidden_size", None) or getattr(c, "n_embd", None) or 1
    heads = getattr(c, "num_attention_heads", None) or getattr(c, "n_head", None) or 1
    return Dimensions(layers=getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer", None) or 1,
                      width=width, heads=heads,
                      mlp_width=getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * width,
                      vocab=getattr(c, "vocab_size", None) or 1,
                      head_width=getattr(c, "head_dim", None) or width // heads,
                      kv_heads=getattr(c, "num_key_value_heads", None) or heads)


def load_causal_lm(model) -> nn.Module:
    """``model`` itself, or the causal LM saved in the local directory ``model`` (no hub access)."""
    if isinstance(model, (str, os.PathLike)):
        if not os.path.isdir(model):
            raise FastLLCError(f"{os.fspath(model)!r} is not a directory; give a model or a local save_pretrained "
                               "directory (nothing is downloaded)")
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging
        bar = hf_logging.is_progress_bar_enabled()  # its loading bar would interleave with our output
        hf_logging.disable_progress_bar()
        try:
            return AutoModelForCausalLM.from_pretrained(model, local_files_only=True, attn_implementation="eager")
        finally:
            if bar:
                hf_logging.enable_progress_bar()
    return model


class FusedTanhGELU(nn.Module):
    """0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³))) as one kernel (``F.gelu(approximate="tanh")``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


def _tanh_gelu_sites(model: nn.Module) -> list[tuple[nn.Module, str, object]]:
    """(parent, attribute, module or function) of every spelt-out tanh-GELU: transformers'
    ``NewGELUActivation`` modules and TransformerLens's ``gelu_new`` held as an MLP's ``act_fn``."""
    sites = []
    for parent in model.modules():
        for attribute, child in parent.named_children():
            if type(child).__name__ == "NewGELUActivation":
                sites.append((parent, attribute, child))
        act_fn = parent.__dict__.get("act_fn")
        if getattr(act_fn, "__name__", None) == "gelu_new" and \
                getattr(act_fn, "__module__", "").startswith("transformer_lens"):
            sites.append((parent, "act_fn", act_fn))
    return sites


def _fused_like(original):
    """The one-kernel tanh-GELU in the form ``original`` takes: a module for a module, a function for a function."""
    return FusedTanhGELU() if isinstance(original, nn.Module) else functools.partial(F.gelu, approximate="tanh")


@contextlib.contextmanager
def sampling_mode(model: nn.Module, attention: str | None = "eager", fused_gelu: bool = True):
    """The model as the chains need it (module docstring), restored on exit."""
    training = [(module, module.training) for module in model.modules()]
    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    swapped = _tanh_gelu_sites(model) if fused_gelu else []
    try:
        for parent, attribute, original in swapped:
            setattr(parent, attribute, _fused_like(original))
        model.eval()
        if attention is not None and previous is not None and previous != attention:
            _set_attention(model, attention)
        yield model
    finally:
        for parent, attribute, original in swapped:
            setattr(parent, attribute, original)
        if attention is not None and previous is not None and getattr(config, "_attn_implementation", None) != previous:
            _set_attention(model, previous)
        for module, mode in training:
            module.training = mode


def _set_attention(model: nn.Module, implementation: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(implementation)
    else:  # older transformers: the config field is what the attention modules read
        model.config._attn_implementation = implementation
