"""The operations of the transformer engine (``engines/transformer.py``) over C chains' stacked weights, each one
batched ATen call over all chains: linear layers (Conv1D's x·W and nn.Linear's x·Wᵀ) by ``baddbmm`` over [C, N, in],
layer and RMS norms with per-chain gains, rotary embeddings, causal attention by ``baddbmm`` onto the causal mask, the
tanh-GELU with its derivative kept from the forward (``TanhGELU``), and each chain's mean next-token cross-entropy."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE = -100  # data.IGNORE (not imported: this module is imported by the backend's cheap ``supports``)

_SQRT_2_OVER_PI, _GELU_CUBIC = math.sqrt(2 / math.pi), 0.044715


class TanhGELU(torch.autograd.Function):
    """½x(1 + tanh(√(2/π)(x + 0.044715x³))) (transformers' ``gelu_new``, ``F.gelu(approximate="tanh")``),
    written as x·σ(2u), u = √(2/π)(x + 0.044715x³) (the same function: ½(1 + tanh u) = σ(2u)), with its
    derivative σ + x·σ(1 − σ)·2u' computed in the forward pass and kept instead of x: the backward is one
    multiplication. σ is one of torch's fast vector kernels where tanh is not: forward and backward together,
    one thread of Zen 4, 0.55 ms against ``F.gelu(approximate="tanh")``'s 0.97 ms on 256k elements (2 chains of
    the bench's tiny GPT-2), 3.5–4.2 against 4.1–4.7 ms on 1M (8 chains: memory-bound). Against float64: the
    value within 1.3 ulps of max(1, |y|) (F.gelu's: 1.3), the derivative within 17 (F.gelu's: 9; the sum cancels
    for negative x); tests/test_backend_transformer.py."""

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


def tanh_gelu_into(x: torch.Tensor, y: torch.Tensor, derivative: torch.Tensor, s: torch.Tensor) -> None:
    """``TanhGELU.forward``'s operations, in the same order (the same bits), written into buffers of x's shape:
    y = GELU(x), ``derivative`` its slope; ``s`` and x itself are overwritten (scratch)."""
    c, a = _SQRT_2_OVER_PI, _GELU_CUBIC
    two_c = x.new_tensor(2 * c)
    torch.mul(x, x, out=derivative)  # x²
    torch.add(two_c, derivative, alpha=2 * c * a, out=s).mul_(x).sigmoid_()  # σ(2u)
    torch.mul(s, x, out=y)
    torch.add(two_c, derivative, alpha=6 * c * a, out=x)  # 2u'
    torch.addcmul(y, y, s, value=-1, out=derivative)
    torch.addcmul(s, derivative, x, out=derivative)  # σ + x·σ·(1 − σ)·2u'


ACTIVATIONS = {  # config.activation_function → the same function as transformers' ACT2FN, one kernel each
    "gelu_new": _tanh_gelu, "gelu_pytorch_tanh": _tanh_gelu, "gelu": F.gelu, "relu": F.relu, "silu": F.silu,
    "swish": F.silu,
}

def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x [C, N, in] · W [C, in, out] + b [C, out], every chain its own W and b (Conv1D's layout)."""
    return torch.baddbmm(b.unsqueeze(1), x, w)


def pair_of(weights, pair: tuple[int, int | None]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A layer's (weight, bias or None) from the chains' stacked weights by their indices."""
    return weights[pair[0]], None if pair[1] is None else weights[pair[1]]


def dense(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x [C, N, in] · Wᵀ + b for nn.Linear's W [C, out, in] and b [C, out] (or None)."""
    if b is None:
        return torch.bmm(x, w.transpose(1, 2))
    return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))


def layer_norm(x: torch.Tensor, g: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dimension of [C, N, D] with chain c's gain and bias [C, D]. (Folding g and b into the
    next linear layer's weights instead measured no faster.)"""
    return torch.addcmul(b.unsqueeze(1), F.layer_norm(x, x.shape[-1:], eps=eps), g.unsqueeze(1))


def rms_norm(x: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm (Llama's: x / √(mean x² + ε), then the gain) of [C, N, D] with chain c's gain [C, D]."""
    return g.unsqueeze(1) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of the first cos.shape[-1] dimensions of each head of x [B, heads, T, d] (transformers'
    ``apply_rotary_pos_emb`` with ``rotate_half``); the rest pass unchanged."""
    n = cos.shape[-1]
    part, rest = (x, None) if n == x.shape[-1] else (x[..., :n], x[..., n:])
    halves = torch.cat((-part[..., n // 2:], part[..., : n // 2]), dim=-1)
    rotated = part * cos + halves * sin
    return rotated if rest is None else torch.cat((rotated, rest), dim=-1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
    """Causal self-attention of q, k, v [B, heads, T, d] (any strides) → [B, T, heads·d], the heads side by side.
    Scores by one ``baddbmm`` onto the causal mask (−inf above the diagonal), softmax, one ``bmm``: measured 1.3×
    faster forward and backward than ``scaled_dot_product_attention``'s CPU kernel at T = 32, d = 16."""
    B, heads, T, d = q.shape
    q, k, v = (z.reshape(B * heads, T, d) for z in (q, k, v))
    scores = torch.baddbmm(causal_mask(T, q), q, k.transpose(1, 2), alpha=scaling)
    out = torch.bmm(torch.softmax(scores, dim=-1), v)
    return out.view(B, heads, T, d).transpose(1, 2).reshape(B, T, heads * d)


def causal_mask(T: int, like: torch.Tensor) -> torch.Tensor:
    """[T, T]: 0 on and below the diagonal, −inf above (what position i may not attend to)."""
    return torch.full((T, T), float("-inf"), dtype=like.dtype, device=like.device).triu_(1)


def chain_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[C] mean cross-entropy of each chain's logits [C, N, V] against its targets (IGNORE not counted)."""
    C, _, V = logits.shape
    flat = targets.reshape(C, -1)
    each = F.cross_entropy(logits.reshape(-1, V), flat.reshape(-1), ignore_index=IGNORE, reduction="none")
    return each.view(C, -1).sum(dim=1) / (flat != IGNORE).sum(dim=1)
