"""Transformer causal LMs evaluated for C chains at once, the chains folded into the batch dimension: the
math of known families written in plain torch over stacked per-chain weights, what the ``transformer``
backend (``fastllc/backends/transformer.py``) differentiates with autograd.

Every parameter arrives as a [C, *shape] tensor (a view of the parameter-major buffer,
``sampling/layout.py``) and every activation carries the chain first: [C, m·T, D] for m sequences of T
tokens per chain. A linear layer is one ``torch.baddbmm`` over the chains ([C, m·T, in] · [C, in, out]), the
token embedding one gather from the chains' stacked tables (chain c's token i is row c·V + i), a layer
norm's normalisation runs over all chains at once and its per-chain gain and bias are one ``addcmul``, and
attention runs over the folded batch [C·m·heads, T, d_head] (scores by one ``baddbmm`` onto the causal mask,
softmax, one ``bmm``). The loss of chain c is its mean next-token cross-entropy over its predicted tokens
(``data.next_token_loss`` per chain). No ``torch.func.vmap``: each operation is one batched ATen call over all
chains, and autograd differentiates them (the tanh-GELU has its own backward, ``TanhGELU``).

Families (``FAMILIES``, by ``config.model_type`` and the wrapped class; everything else is refused in one
line by ``unsupported``):
    gpt2   ``GPT2LMHeadModel``: learned positions, pre-LN blocks, Conv1D weights [in, out] (x·W), fused
           q|k|v, the activation of ``config.activation_function`` (``ACTIVATIONS``), tied or untied
           unembedding, ``scale_attn_weights`` / ``scale_attn_by_inverse_layer_idx``.
Which tensor plays which part is read from the Hugging Face module itself (``model.transformer.h[l].attn
.c_attn.weight`` ...), matched by identity to the flat parameter list, so a tied unembedding is the token
embedding's own chain copy and a renamed wrapper changes nothing.

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
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100  # data.IGNORE (not imported: this module is imported by the backend's cheap ``supports``)


_SQRT_2_OVER_PI, _GELU_CUBIC = math.sqrt(2 / math.pi), 0.044715


class TanhGELU(torch.autograd.Function):
    """½x(1 + tanh(√(2/π)(x + 0.044715x³))) (transformers' ``gelu_new``, ``F.gelu(approximate="tanh")``),
    written as x·σ(2u), u = √(2/π)(x + 0.044715x³) (the same function: ½(1 + tanh u) = σ(2u)), with its derivative
    σ + x·σ(1 − σ)·2u' computed in the forward pass and kept instead of x: the backward is one multiplication.
    σ is one of torch's fast vector kernels where tanh is not: measured on Zen 4 (one thread, 1M elements)
    1.75 ms forward and 1.95 ms backward for ``F.gelu(approximate="tanh")``, about 1.5 ms and 0.2 ms here.
    Within a few ulps of ``F.gelu`` (tested)."""

    @staticmethod
    def forward(ctx, x):
        c, a = _SQRT_2_OVER_PI, _GELU_CUBIC
        square = x * x
        s = torch.add(x.new_tensor(2 * c), square, alpha=2 * c * a).mul_(x).sigmoid_()  # σ(2u), 2u = x(2c + 2ca·x²)
        slope = torch.add(x.new_tensor(2 * c), square, alpha=6 * c * a, out=square)  # 2u' = 2c + 6ca·x²
        y = s * x
        derivative = torch.addcmul(s, torch.addcmul(y, y, s, value=-1), slope)  # σ + x·σ·(1 − σ)·2u'
        ctx.save_for_backward(derivative)
        return y

    @staticmethod
    def backward(ctx, grad):
        (derivative,) = ctx.saved_tensors
        return grad * derivative


def _tanh_gelu(x):
    return TanhGELU.apply(x)


ACTIVATIONS = {  # config.activation_function → the same function as transformers' ACT2FN, one kernel each
    "gelu_new": _tanh_gelu, "gelu_pytorch_tanh": _tanh_gelu, "gelu": F.gelu, "relu": F.relu, "silu": F.silu,
    "swish": F.silu,
}
FAMILIES = {"gpt2": "GPT2LMHeadModel"}  # config.model_type → the causal-LM class whose forward is written here


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
    config = hf.config
    family = getattr(config, "model_type", None)
    if FAMILIES.get(family) != type(hf).__name__:
        return (f"the transformer backend runs {', '.join(FAMILIES.values())}, not {type(hf).__name__} "
                f"(model type {family!r}); use backend='generic'")
    return _unsupported_module(model) or _unsupported_gpt2(config)


def _unsupported_module(model) -> str | None:
    """Settings of the module tree the written forward does not follow."""
    parameters = list(model.parameters())
    if any(p.dtype != torch.float32 for p in parameters):
        return "the transformer backend runs float32 weights; use backend='generic'"
    if not all(p.requires_grad for p in parameters):
        return "the transformer backend samples every weight (some have requires_grad=False); use backend='generic'"
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and module.training and module.p > 0:
            return (f"dropout is on in '{name}' (training mode): the transformer backend evaluates the model "
                    "in eval mode (fastllc.lm.sampling_mode); use backend='generic'")
    return None


def _unsupported_gpt2(config) -> str | None:
    if getattr(config, "add_cross_attention", False):
        return "GPT-2 with cross-attention is not a causal LM the transformer backend runs; use backend='generic'"
    if config.activation_function not in ACTIVATIONS:
        return (f"GPT-2 activation {config.activation_function!r} is not one the transformer backend writes "
                f"({', '.join(ACTIVATIONS)}); use backend='generic'")
    return None


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


class Gpt2:
    """GPT-2's forward and next-token loss for C chains (module docstring)."""

    def __init__(self, model, index: dict[int, int]):
        hf = hf_model(model)
        config, body = hf.config, hf.transformer
        pair = lambda module: (index[id(module.weight)], index[id(module.bias)])
        self.wte, self.wpe = index[id(body.wte.weight)], index[id(body.wpe.weight)]
        self.unembed = index[id(hf.lm_head.weight)]  # the token embedding's index when tied
        self.ln_f, self.eps = pair(body.ln_f), config.layer_norm_epsilon
        self.heads = config.n_head
        self.activation = ACTIVATIONS[config.activation_function]
        self.blocks = [_Gpt2Block(pair(b.ln_1), pair(b.attn.c_attn), pair(b.attn.c_proj), pair(b.ln_2),
                                  pair(b.mlp.c_fc), pair(b.mlp.c_proj), _gpt2_scaling(config, layer))
                       for layer, b in enumerate(body.h)]

    def losses(self, weights, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Each chain's mean next-token loss [C]: ``weights`` the [C, *shape] parameters in flat order,
        ``tokens`` [C, m, T], ``targets`` [C, m, T−1] (IGNORE where not predicted)."""
        C, m, T = tokens.shape
        wte = weights[self.wte]
        V, D = wte.shape[1:]
        rows = tokens + torch.arange(0, C * V, V, device=tokens.device).view(C, 1, 1)
        x = F.embedding(rows, wte.reshape(C * V, D)) + weights[self.wpe][:, None, :T]
        x = x.view(C, m * T, D)
        for block in self.blocks:
            x = self._block(weights, block, x, m, T)
        x = x.view(C, m, T, D)[:, :, :-1].reshape(C, m * (T - 1), D)  # the last position predicts nothing
        x = layer_norm(x, weights[self.ln_f[0]], weights[self.ln_f[1]], self.eps)
        logits = torch.bmm(x, weights[self.unembed].transpose(1, 2))  # the unembedding [C, V, D], x·Eᵀ
        return chain_cross_entropy(logits, targets)

    def _block(self, weights, block: _Gpt2Block, x: torch.Tensor, m: int, T: int) -> torch.Tensor:
        w = lambda pair: (weights[pair[0]], weights[pair[1]])
        qkv = linear(layer_norm(x, *w(block.ln_1), self.eps), *w(block.c_attn))
        x = x + linear(causal_attention(qkv, m, T, self.heads, block.scaling), *w(block.attn_proj))
        hidden = self.activation(linear(layer_norm(x, *w(block.ln_2), self.eps), *w(block.c_fc)))
        return x + linear(hidden, *w(block.mlp_proj))


def _gpt2_scaling(config, layer: int) -> float:
    """GPT2Attention.scaling: 1/√d_head when ``scale_attn_weights``, over (layer + 1) when scaled by layer."""
    scaling = (config.n_embd // config.n_head) ** -0.5 if config.scale_attn_weights else 1.0
    return scaling / (layer + 1) if config.scale_attn_by_inverse_layer_idx else scaling


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x [C, N, in] · W [C, in, out] + b [C, out], every chain its own W and b (Conv1D's layout)."""
    return torch.baddbmm(b.unsqueeze(1), x, w)


def layer_norm(x: torch.Tensor, g: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dimension of [C, N, D] with chain c's gain and bias [C, D]. (Folding g and b into the
    next linear layer's weights instead measured no faster.)"""
    return torch.addcmul(b.unsqueeze(1), F.layer_norm(x, x.shape[-1:], eps=eps), g.unsqueeze(1))


def causal_attention(qkv: torch.Tensor, m: int, T: int, heads: int, scaling: float) -> torch.Tensor:
    """Causal self-attention of every sequence of every chain: ``qkv`` [C, m·T, 3·D] (q | k | v, head h at
    columns h·d_head of each) → [C, m·T, D], the heads side by side. Scores by one ``baddbmm`` onto the causal
    mask (−inf above the diagonal), softmax, one ``bmm``: measured 1.3× faster forward and backward than
    ``scaled_dot_product_attention``'s CPU kernel at T = 32, d_head = 16."""
    C, _, three_d = qkv.shape
    D = three_d // 3
    q, k, v = (z.reshape(C * m * heads, T, D // heads)
               for z in qkv.view(C * m, T, 3, heads, D // heads).permute(2, 0, 3, 1, 4))
    scores = torch.baddbmm(_causal_mask(T, qkv), q, k.transpose(1, 2), alpha=scaling)
    out = torch.bmm(torch.softmax(scores, dim=-1), v)
    return out.view(C * m, heads, T, D // heads).transpose(1, 2).reshape(C, m * T, D)


def _causal_mask(T: int, like: torch.Tensor) -> torch.Tensor:
    """[T, T]: 0 on and below the diagonal, −inf above (what position i may not attend to)."""
    return torch.full((T, T), float("-inf"), dtype=like.dtype, device=like.device).triu_(1)


def chain_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[C] mean cross-entropy of each chain's logits [C, N, V] against its targets (IGNORE not counted)."""
    C, _, V = logits.shape
    flat = targets.reshape(C, -1)
    each = F.cross_entropy(logits.reshape(-1, V), flat.reshape(-1), ignore_index=IGNORE, reduction="none")
    return each.view(C, -1).sum(dim=1) / (flat != IGNORE).sum(dim=1)


def build(model, names: list[str]):
    """The engine of ``model`` (a CausalLM that ``unsupported`` accepts), its weights indexed as ``names``
    (the flat parameter order, ``contract.flat_parameters``)."""
    tensors = dict(model.named_parameters())
    index = {id(tensors[name]): i for i, name in enumerate(names)}
    return Gpt2(model, index)


__all__ = ["ACTIVATIONS", "FAMILIES", "Gpt2", "build", "unsupported"]
