"""Causal language models as the module fastllc samples: tokens [B, T] → next-token logits [B, T−1, V].

``CausalLM`` wraps a Hugging Face ``transformers`` causal LM (built from a config, or loaded from a local
``save_pretrained`` directory: ``load_causal_lm``); its parameters are the wrapped model's own (no copy),
named ``model.<the model's own name>``. ``sampling_mode`` puts the model in the state the chains need and
restores it afterwards, whatever happens:

- ``eval()`` on every module (dropout off: L_m is a function of the weights and the minibatch only), the
  training flag of each module restored afterwards;
- attention ``"eager"`` (``config._attn_implementation``), restored afterwards. Why: the chains are
  evaluated under ``torch.func.vmap``, which has no batching rule for the CPU scaled-dot-product kernel
  (``aten::_scaled_dot_product_flash_attention_for_cpu``) and falls back to a Python loop over chains; the
  eager path is matmul + softmax, which vmap batches (one bmm over all chains);
- ``fused_gelu``: GPT-2's ``NewGELUActivation`` (tanh-GELU spelt as seven element-wise ops) replaced by
  ``F.gelu(approximate="tanh")``, one fused kernel, the same function to fp32 rounding (|Δ| ≲ 1e-6
  relative; tested). The element-wise ops were ~45% of a tiny GPT-2's step on the CPU.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import FastLLCError


class CausalLM(nn.Module):
    """tokens [B, T] (int64) → logits [B, T−1, V] of the wrapped Hugging Face causal LM (position t predicts
    token t+1; the last position predicts nothing in the data and is dropped).

    A batch of more than ``chunk`` sequences (the backends' pass over all the data for L_n(w*) and ∇L_n(w*))
    runs ``chunk`` sequences at a time, each under activation checkpointing when autograd records it: the
    backward pass recomputes one chunk's activations at a time, so that pass holds one chunk's activations
    instead of all N sequences' (GBs for 8,192 sequences of a tiny GPT-2), for one extra forward. Minibatches
    (≤ ``chunk`` sequences per chain) run in one piece. Chunking changes no value: each sequence's logits
    do not depend on the others in its batch."""

    def __init__(self, model: nn.Module, chunk: int = 512):
        super().__init__()
        if not is_hf_causal_lm(model):
            raise FastLLCError(f"fastllc.lm runs a Hugging Face transformers causal LM (a PreTrainedModel with a "
                               f"language-model head) or a local save_pretrained directory, got "
                               f"{type(model).__name__}")
        self.model = model
        self.chunk = chunk

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[0] <= self.chunk:
            return self._logits(tokens)
        pieces = tokens.split(self.chunk)
        if torch.is_grad_enabled():
            return torch.cat([checkpoint(self._logits, piece, use_reentrant=False) for piece in pieces])
        return torch.cat([self._logits(piece) for piece in pieces])

    def _logits(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens, use_cache=False).logits[:, :-1]

    @property
    def vocab_size(self) -> int | None:
        return getattr(self.model.config, "vocab_size", None)


def is_hf_causal_lm(model) -> bool:
    """A transformers model with a language-model head (a bare ``GPT2Model`` has no logits to read)."""
    return (isinstance(model, nn.Module) and hasattr(model, "config") and hasattr(model, "get_output_embeddings")
            and model.get_output_embeddings() is not None)


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


def _tanh_gelu_sites(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, module) of every spelt-out tanh-GELU (transformers' ``NewGELUActivation``)."""
    sites = []
    for parent in model.modules():
        for attribute, child in parent.named_children():
            if type(child).__name__ == "NewGELUActivation":
                sites.append((parent, attribute, child))
    return sites


@contextlib.contextmanager
def sampling_mode(model: nn.Module, attention: str | None = "eager", fused_gelu: bool = True):
    """The model as the chains need it (module docstring), restored on exit."""
    training = [(module, module.training) for module in model.modules()]
    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    swapped = _tanh_gelu_sites(model) if fused_gelu else []
    try:
        for parent, attribute, _ in swapped:
            setattr(parent, attribute, FusedTanhGELU())
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
