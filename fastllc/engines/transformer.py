"""Transformer causal LMs evaluated for C chains at once, the chains folded into the batch dimension: the
math of known families written in plain torch over stacked per-chain weights, what the ``transformer``
backend (``fastllc/backends/transformer.py``) differentiates: GPT-2 with the tanh-GELU by its backward spelt
out (``Gpt2.losses_and_gradients``), the rest with autograd.

Every parameter arrives as a [C, *shape] tensor (a view of the parameter-major buffer,
``sampling/layout.py``) and every activation carries the chain first: [C, m·T, D] for m sequences of T
tokens per chain. A linear layer is one ``torch.baddbmm`` over the chains ([C, m·T, in] · [C, in, out]), the
token embedding one gather from the chains' stacked tables (chain c's token i is row c·V + i), a layer
norm's normalisation runs over all chains at once and its per-chain gain and bias are one ``addcmul``, and
attention runs over the folded batch [C·m·heads, T, d_head] (scores by one ``baddbmm`` onto the causal mask,
softmax, one ``bmm``). The loss of chain c is its mean next-token cross-entropy over its predicted tokens
(``data.next_token_loss`` per chain). No ``torch.func.vmap``: each operation is one batched ATen call over all
chains, and autograd differentiates them (the tanh-GELU has its own backward, ``TanhGELU``), except where the
backward is written out: GPT-2's (``gpt2_backward.Gpt2Pass``), the same derivatives without autograd's graph, its activations
in buffers kept from step to step, each weight's gradient written straight into the gradient buffer.

Families (``FAMILIES``, by ``config.model_type`` and the wrapped class; everything else is refused in one
line by ``unsupported``):
    gpt2      ``GPT2LMHeadModel``: learned positions, pre-LN blocks, Conv1D weights [in, out] (x·W), fused
              q | k | v, ``scale_attn_weights`` / ``scale_attn_by_inverse_layer_idx``.
    gpt_neox  ``GPTNeoXForCausalLM`` (Pythia): nn.Linear weights [out, in], q | k | v interleaved per head,
              rotary embeddings on part of each head, parallel or sequential residual.
    llama     ``LlamaForCausalLM``: RMSNorm, separate q, k, v with grouped-query attention, rotary embeddings,
              gated MLP, optional biases, the embedding's padding row (no gradient from the lookup).
Each with the activation its config names (``ACTIVATIONS``) and a tied or untied unembedding. Which tensor
plays which part is read from the Hugging Face module itself (``model.transformer.h[l].attn.c_attn.weight``,
``get_input_embeddings()``, ...), matched by identity to the flat parameter list, so a tied unembedding is
the token embedding's own chain copy and a renamed wrapper changes nothing. The rotary tables come from the
model's own rotary module (whatever RoPE scaling it implements), once per sequence length.

Same function as the module, to fp32 rounding: the operations are the Hugging Face implementation's; only the
blocking of sums differs (batched matmuls over chains; the attention's scale applied inside the score product)
and the tanh-GELU is spelt x·σ(2u), within a few ulps of every activation (checked against the module itself in
tests/test_backend_transformer.py).

Speed (tiny GPT-2: 2 layers, width 64, minibatches of 16 sequences of 32 tokens; one thread of a Zen 4 core):
the step is ~55–60% matmul (MKL's sgemm at ~80 GFLOP/s, of which about a quarter is packing the small
operands); the rest is element-wise passes over the activations, bounded by memory once a group's
activations leave the L2 cache. ``torch.compile`` of the loss and its backward (Inductor, CPU) was measured
and rejected: 1.2–1.3× per step at 8 chains, but 78 s to compile cold and 16 s with a warm cache, per chain
count, against ~15 s for a 200-step run of 16 chains; it would pay only for runs of thousands of steps.
GPT-2's backward written out (no autograd graph, no fresh megabyte tensors each step, no gradient concatenation,
q | k | v copied once): 1.07–1.12× the autograd step end to end at 16 chains
on 2 cores (3 interleaved rounds, load 2–3), 1.14–1.16× per folded batch of 4 chains on one thread. What remains:
~60% sgemm (the attention's 32×32×16 products at ~30–55 GFLOP/s, the rest at ~70–75), ~25% element-wise passes
(the tanh-GELU's seven alone ~5%, layer norms ~8%), ~5% the noise fill.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from . import transformer_cpu
from .gpt2_backward import Gpt2Pass, Workspace
from .transformer_ops import (ACTIVATIONS, IGNORE, TanhGELU, _tanh_gelu, attend, chain_cross_entropy, dense,
                              layer_norm, linear, pair_of, rms_norm, rotate, tanh_gelu_into)

KERNELS_ENV = "FASTLLC_TRANSFORMER_KERNELS"
FAMILIES = {  # config.model_type → the causal-LM class whose forward is written here
    "gpt2": "GPT2LMHeadModel", "gpt_neox": "GPTNeoXForCausalLM", "llama": "LlamaForCausalLM",
}




def hf_model(model):
    """The Hugging Face model inside ``fastllc.lm.models.CausalLM``, or None when ``model`` is not one."""
    models = sys.modules.get("fastllc.lm.models")  # never imported here: if it is not loaded, no CausalLM exists
    if models is None or not isinstance(model, models.CausalLM):
        return None
    return model.model


def unsupported(model, loss_fn) -> str | None:
    """Why the engine cannot run ``model`` with ``loss_fn`` (one line), or None when it can. Cheap: reads
    the config and the module tree, computes nothing."""
    hf = hf_model(model)
    if hf is None:
        return (f"the transformer backend runs a fastllc.lm.CausalLM (what fastllc.lm.estimate builds), got "
                f"{type(model).__name__}")
    data = sys.modules.get("fastllc.lm.data")
    if data is None or loss_fn is not data.next_token_loss:
        return "the transformer backend computes fastllc.lm.next_token_loss itself; other losses need backend='generic'"
    family = getattr(getattr(hf, "config", None), "model_type", None)
    if FAMILIES.get(family) != type(hf).__name__:
        return (f"the transformer backend runs {', '.join(FAMILIES.values())}, not {type(hf).__name__} "
                f"(model type {family!r}); use backend='generic'")
    return _unsupported_module(model) or _unsupported_config(hf)


def _unsupported_module(model) -> str | None:
    """Settings of the module tree the written forward does not follow."""
    parameters = list(model.parameters())
    if any(p.dtype != torch.float32 for p in parameters):
        return "the transformer backend runs float32 weights; use backend='generic'"
    if getattr(model, "autocast", None) is not None:
        return "the transformer backend computes in float32; bf16 autocast runs on backend='generic'"
    if not all(p.requires_grad for p in parameters):
        return "the transformer backend samples every weight (some have requires_grad=False); use backend='generic'"
    on = [name for name, module in model.named_modules()
          if isinstance(module, torch.nn.Dropout) and module.training and module.p > 0]
    rates = dropout_rates(model.model) if on else None
    if on and model.model.get_input_embeddings().padding_idx is not None:
        rates = "an embedding with a padding row, which only autograd's forward follows"
    if isinstance(rates, str):
        return (f"dropout is on in '{on[0]}' (training mode), which the transformer backend writes only for GPT-2 with "
                f"the tanh-GELU ({rates}); use backend='generic'")
    if getattr(model.model.get_output_embeddings(), "bias", None) is not None:
        return "the transformer backend writes an unembedding without bias; use backend='generic'"
    return None


@dataclass(frozen=True)
class Dropout:
    """Dropout probabilities of GPT-2's written pass in training mode (all 0 in eval mode): after the embedding
    (``transformer.drop``), on the attention's probabilities (``attn.attn_dropout``), and after the attention's and
    the MLP's output projections (``attn.resid_dropout``, ``mlp.dropout``)."""
    embedded: float = 0.0
    attention: float = 0.0
    residual: float = 0.0


def dropout_rates(hf) -> Dropout | str:
    """The Dropout of a Hugging Face GPT-2 as its modules are now, or why the written pass cannot follow them (one
    line): another family or activation, or modules whose mode or probability differ from layer to layer."""
    config = hf.config
    if config.model_type != "gpt2" or config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        return f"{config.model_type} with {getattr(config, 'activation_function', None) or config.hidden_act}"
    body = hf.transformer
    rate = lambda module: module.p if module.training else 0.0  # noqa: E731
    attention = {rate(b.attn.attn_dropout) for b in body.h}
    residual = {rate(m) for b in body.h for m in (b.attn.resid_dropout, b.mlp.dropout)}
    if len(attention) > 1 or len(residual) > 1:
        return "dropout modules in different modes or with different probabilities"
    return Dropout(rate(body.drop), attention.pop() if attention else 0.0, residual.pop() if residual else 0.0)


def _unsupported_config(hf) -> str | None:
    """Options of the family's config that its written forward does not follow."""
    config = hf.config
    if config.model_type == "gpt2":
        if getattr(config, "add_cross_attention", False):
            return "GPT-2 with cross-attention is not a causal LM the transformer backend runs; use backend='generic'"
        activation = config.activation_function
    else:
        activation = config.hidden_act
    if activation not in ACTIVATIONS:
        return (f"activation {activation!r} is not one the transformer backend writes ({', '.join(ACTIVATIONS)}); "
                "use backend='generic'")
    if config.model_type == "llama" and getattr(config, "pretraining_tp", 1) != 1:
        return "Llama with pretraining_tp > 1 is not written in the transformer backend; use backend='generic'"
    if config.model_type != "gpt2" and not hasattr(hf.base_model, "rotary_emb"):
        return ("the transformer backend reads the rotary tables from the model's rotary_emb module, which this "
                "transformers version does not have; use backend='generic'")
    return None


def build(model, names: list[str]):
    """The engine of ``model`` (a CausalLM that ``unsupported`` accepts), its weights indexed as ``names``
    (the flat parameter order, ``contract.flat_parameters``)."""
    tensors = dict(model.named_parameters())
    index = {id(tensors[name]): i for i, name in enumerate(names)}
    hf = hf_model(model)
    return {"gpt2": Gpt2, "gpt_neox": NeoX, "llama": Llama}[hf.config.model_type](hf, index)


class _Engine:
    """The forward shared by the families: token embedding, blocks, final norm, unembedding, per-chain loss."""

    def __init__(self, hf, index: dict[int, int]):
        self.index = index
        embedding = hf.get_input_embeddings()
        self.wte, self.padding_idx = index[id(embedding.weight)], embedding.padding_idx
        self.unembed = index[id(hf.get_output_embeddings().weight)]  # the token embedding's index when tied

    def losses(self, weights, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Each chain's mean next-token loss [C]: ``weights`` the [C, *shape] parameters in flat order,
        ``tokens`` [C, m, T], ``targets`` [C, m, T−1] (IGNORE where not predicted)."""
        C, m, T = tokens.shape
        x = self._embed(weights, tokens)
        for block in self.blocks:
            x = self._block(weights, block, x, m, T)
        D = x.shape[-1]
        x = x.view(C, m, T, D)[:, :, :-1].reshape(C, m * (T - 1), D)  # the last position predicts nothing
        logits = torch.bmm(self._final_norm(weights, x), weights[self.unembed].transpose(1, 2))  # x·Eᵀ, E [C, V, D]
        return chain_cross_entropy(logits, targets)

    def _embed(self, weights, tokens: torch.Tensor) -> torch.Tensor:
        """[C, m·T, D]: chain c's token i is row c·V + i of the chains' stacked tables."""
        C, m, T = tokens.shape
        table = weights[self.wte]
        V, D = table.shape[1:]
        rows = tokens + torch.arange(0, C * V, V, device=tokens.device).view(C, 1, 1)
        x = F.embedding(rows, table.reshape(C * V, D))
        if self.padding_idx is not None:  # nn.Embedding gives its padding row no gradient from the lookup
            x = torch.where((tokens == self.padding_idx).unsqueeze(-1), x.detach(), x)
        return x.view(C, m * T, D)

    def widest(self, T: int) -> int:
        """Floats per token of the widest activation a block keeps: q | k | v, the MLP's hidden units, or the
        attention scores (heads × T)."""
        return max(self.width, self.heads * T)

    def _pair(self, module) -> tuple[int, int | None]:
        """Flat indices of a module's weight and bias (None without one)."""
        return self.index[id(module.weight)], None if module.bias is None else self.index[id(module.bias)]


@dataclass(frozen=True)
class _Gpt2Block:
    """Flat indices of one block's weights."""
    ln_1: tuple[int, int]
    c_attn: tuple[int, int]
    attn_proj: tuple[int, int]
    ln_2: tuple[int, int]
    c_fc: tuple[int, int]
    mlp_proj: tuple[int, int]
    scaling: float


class Gpt2(_Engine):
    """GPT-2 (``GPT2LMHeadModel``): learned positions, pre-LN blocks, Conv1D weights [in, out] (x·W), fused
    q | k | v."""

    def __init__(self, hf, index: dict[int, int]):
        super().__init__(hf, index)
        config, body = hf.config, hf.transformer
        self.wpe, self.ln_f, self.eps = index[id(body.wpe.weight)], self._pair(body.ln_f), config.layer_norm_epsilon
        self.heads = config.n_head
        self.width = max(3 * config.n_embd, config.n_inner or 4 * config.n_embd)
        self.activation = ACTIVATIONS[config.activation_function]
        self.blocks = [_Gpt2Block(self._pair(b.ln_1), self._pair(b.attn.c_attn), self._pair(b.attn.c_proj),
                                  self._pair(b.ln_2), self._pair(b.mlp.c_fc), self._pair(b.mlp.c_proj),
                                  _gpt2_scaling(config, layer)) for layer, b in enumerate(body.h)]
        # the written-out pass's fused CPU passes, built on first use (None: ATen's operations, as where they cannot
        # be built; FASTLLC_TRANSFORMER_KERNELS=torch chooses ATen's, for comparisons)
        use = os.environ.get(KERNELS_ENV, "native") != "torch"
        self.kernels = transformer_cpu.library() if use else None
        rates = dropout_rates(hf)  # the modules' mode when the engine is built: sampling keeps it
        self.dropout = rates if isinstance(rates, Dropout) else Dropout()
        self.masks: dict | None = None  # tests: {name: mask} of the last pass's dropout

    def _embed(self, weights, tokens):
        C, m, T = tokens.shape
        x = super()._embed(weights, tokens).view(C, m, T, -1) + weights[self.wpe][:, None, :T]
        return x.view(C, m * T, -1)

    def _block(self, weights, block: _Gpt2Block, x: torch.Tensor, m: int, T: int) -> torch.Tensor:
        w = partial(pair_of, weights)
        C, _, D = x.shape
        qkv = linear(layer_norm(x, *w(block.ln_1), self.eps), *w(block.c_attn))  # [C, m·T, 3·D]
        q, k, v = qkv.view(C * m, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # [C·m, heads, T, d]
        x = x + linear(attend(q, k, v, block.scaling).view(C, m * T, D), *w(block.attn_proj))
        hidden = self.activation(linear(layer_norm(x, *w(block.ln_2), self.eps), *w(block.c_fc)))
        return x + linear(hidden, *w(block.mlp_proj))

    def _final_norm(self, weights, x):
        return layer_norm(x, weights[self.ln_f[0]], weights[self.ln_f[1]], self.eps)

    def losses_and_gradients(self, weights, grads, tokens: torch.Tensor, targets: torch.Tensor,
                             buffers: Workspace) -> torch.Tensor:
        """``losses`` [C] and their gradient written into ``grads`` (the [C, *shape] views of the gradient buffer,
        every element overwritten), without autograd: the same operations forward, their derivatives spelt out
        backward (``gpt2_backward.Gpt2Pass``), in ``buffers`` reused from step to step (the caller's ``Workspace``)."""
        with torch.no_grad():
            return Gpt2Pass(self, weights, grads, buffers).run(tokens, targets)

    @property
    def writes_gradients(self) -> bool:
        """Whether ``losses_and_gradients`` is written for this model: the tanh-GELU, no embedding padding row."""
        return self.activation is _tanh_gelu and self.padding_idx is None


def _gpt2_scaling(config, layer: int) -> float:
    """GPT2Attention.scaling: 1/√d_head when ``scale_attn_weights``, over (layer + 1) when scaled by layer."""
    scaling = (config.n_embd // config.n_head) ** -0.5 if config.scale_attn_weights else 1.0
    return scaling / (layer + 1) if config.scale_attn_by_inverse_layer_idx else scaling


def _scaling(attention, config) -> float:
    """The attention module's own ``scaling`` where transformers keeps one, else 1/√d_head (older versions)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return getattr(attention, "scaling", head_dim ** -0.5)


class _Rotary(_Engine):
    """Families with rotary position embeddings: cos and sin from the model's own rotary module (any RoPE
    scaling it implements), computed once per sequence length, without autograd."""

    def __init__(self, hf, index: dict[int, int], rotary):
        super().__init__(hf, index)
        self.rotary, self.tables = rotary, {}

    def _cos_sin(self, T: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if T not in self.tables:
            with torch.no_grad():
                positions = torch.arange(T, device=like.device).unsqueeze(0)
                cos, sin = self.rotary(like.new_zeros(1, T, 1), positions)
            self.tables[T] = cos[0].to(like.dtype), sin[0].to(like.dtype)  # [T, rotary dims]
        return self.tables[T]


@dataclass(frozen=True)
class _NeoXBlock:
    ln_1: tuple[int, int]
    qkv: tuple[int, int | None]
    dense: tuple[int, int | None]
    ln_2: tuple[int, int]
    up: tuple[int, int | None]
    down: tuple[int, int | None]
    scaling: float


class NeoX(_Rotary):
    """GPT-NeoX / Pythia (``GPTNeoXForCausalLM``): nn.Linear weights [out, in], fused q | k | v interleaved per
    head, rotary on the first ``rotary_ndims`` of each head, parallel or sequential residual."""

    def __init__(self, hf, index: dict[int, int]):
        super().__init__(hf, index, hf.base_model.rotary_emb)
        config, body = hf.config, hf.gpt_neox
        self.heads, self.eps = config.num_attention_heads, config.layer_norm_eps
        self.parallel = config.use_parallel_residual
        self.width = max(3 * config.hidden_size, config.intermediate_size)
        self.activation = ACTIVATIONS[config.hidden_act]
        self.final = self._pair(body.final_layer_norm)
        self.blocks = [_NeoXBlock(self._pair(b.input_layernorm), self._pair(b.attention.query_key_value),
                                  self._pair(b.attention.dense), self._pair(b.post_attention_layernorm),
                                  self._pair(b.mlp.dense_h_to_4h), self._pair(b.mlp.dense_4h_to_h),
                                  _scaling(b.attention, config)) for b in body.layers]

    def _block(self, weights, block: _NeoXBlock, x: torch.Tensor, m: int, T: int) -> torch.Tensor:
        w = partial(pair_of, weights)
        C, _, D = x.shape
        qkv = dense(layer_norm(x, *w(block.ln_1), self.eps), *w(block.qkv))  # [C, m·T, 3·D], per head q | k | v
        q, k, v = qkv.view(C * m, T, self.heads, 3 * D // self.heads).transpose(1, 2).chunk(3, dim=-1)
        cos, sin = self._cos_sin(T, x)
        attention = dense(attend(rotate(q, cos, sin), rotate(k, cos, sin), v, block.scaling).view(C, m * T, D),
                          *w(block.dense))
        if self.parallel:
            return x + attention + self._mlp(weights, block, layer_norm(x, *w(block.ln_2), self.eps))
        x = x + attention
        return x + self._mlp(weights, block, layer_norm(x, *w(block.ln_2), self.eps))

    def _mlp(self, weights, block: _NeoXBlock, x: torch.Tensor) -> torch.Tensor:
        w = partial(pair_of, weights)
        return dense(self.activation(dense(x, *w(block.up))), *w(block.down))

    def _final_norm(self, weights, x):
        return layer_norm(x, weights[self.final[0]], weights[self.final[1]], self.eps)


@dataclass(frozen=True)
class _LlamaBlock:
    norm_1: int
    q: tuple[int, int | None]
    k: tuple[int, int | None]
    v: tuple[int, int | None]
    o: tuple[int, int | None]
    norm_2: int
    gate: tuple[int, int | None]
    up: tuple[int, int | None]
    down: tuple[int, int | None]
    scaling: float


class Llama(_Rotary):
    """Llama (``LlamaForCausalLM``): RMSNorm, separate q, k, v projections with grouped-query attention
    (``num_key_value_heads``), rotary embeddings, gated MLP, optional biases."""

    def __init__(self, hf, index: dict[int, int]):
        super().__init__(hf, index, hf.base_model.rotary_emb)
        config, body = hf.config, hf.model
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.eps = config.rms_norm_eps
        self.width = max(3 * config.hidden_size, config.intermediate_size)
        self.activation = ACTIVATIONS[config.hidden_act]
        self.final = index[id(body.norm.weight)]
        self.blocks = [_LlamaBlock(index[id(b.input_layernorm.weight)], *(self._pair(getattr(b.self_attn, f"{p}_proj"))
                                   for p in "qkvo"), index[id(b.post_attention_layernorm.weight)],
                                   *(self._pair(getattr(b.mlp, f"{p}_proj")) for p in ("gate", "up", "down")),
                                   _scaling(b.self_attn, config)) for b in body.layers]

    def _block(self, weights, block: _LlamaBlock, x: torch.Tensor, m: int, T: int) -> torch.Tensor:
        w = partial(pair_of, weights)
        C = x.shape[0]
        h = rms_norm(x, weights[block.norm_1], self.eps)
        q, k, v = (dense(h, *w(pair)).view(C * m, T, heads, -1).transpose(1, 2)
                   for pair, heads in ((block.q, self.heads), (block.k, self.kv_heads), (block.v, self.kv_heads)))
        cos, sin = self._cos_sin(T, x)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if self.kv_heads != self.heads:  # each key/value head serves heads/kv_heads query heads (repeat_kv)
            k, v = (z.repeat_interleave(self.heads // self.kv_heads, dim=1) for z in (k, v))
        x = x + dense(attend(q, k, v, block.scaling).view(C, m * T, -1), *w(block.o))
        h = rms_norm(x, weights[block.norm_2], self.eps)
        return x + dense(self.activation(dense(h, *w(block.gate))) * dense(h, *w(block.up)), *w(block.down))

    def _final_norm(self, weights, x):
        return rms_norm(x, weights[self.final], self.eps)


__all__ = ["ACTIVATIONS", "FAMILIES", "IGNORE", "Dropout", "Gpt2", "Llama", "NeoX", "TanhGELU", "Workspace", "build", "tanh_gelu_into",
           "unsupported"]
