"""The fused CPU passes of GPT-2's written-out step (``fastllc/kernels/transformer_cpu.cpp``), built on first use
by ``native_build`` (the widest vector build this CPU runs, or ``$FASTLLC_NATIVE_VARIANT``) and called on torch
tensors through ctypes: the tanh-GELU with its slope, layer norm with per-chain gain and bias and its backward, and
causal attention straight from the fused q | k | v activation and its backward. ``gpt2_backward.Gpt2Pass`` uses
them when ``library()`` loads, and the torch operations they replace otherwise (the reference they are tested
against, tests/test_transformer_cpu.py).

Why: on the bench's tiny GPT-2 (width 64, 16 sequences of 32 tokens per chain, one thread of a Zen 4 core) the
step spent about a third of its time outside its matrix products, in ATen's element-wise passes over [C, 512, 64]
and [C, 512, 256] activations: the tanh-GELU's seven, layer norm's two forward and five backward per norm, the
attention's permuting copies, its softmax and softmax backward, and [256, 32, 32] products at 30–55 GFLOP/s. Each
kernel here makes one pass where ATen made several (measured in bench/test_bench_transformer.py)."""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import torch

SOURCE = Path(__file__).resolve().parent.parent / "kernels" / "transformer_cpu.cpp"
_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
SIGNATURES = {  # the C functions' parameters, in order
    "fastllc_tanh_gelu": (_I, _P, _P, _P),
    "fastllc_layer_norm": (_I, _I, _I, _P, _P, _P, _F, _P, _P, _P),
    "fastllc_layer_norm_backward": (_I, _I, _I, _P, _P, _P, _P, _P, _P, _P, _P, _P),
    "fastllc_causal_attention": (_I, _I, _I, _I, _F, _P, _P, _P),
    "fastllc_causal_attention_backward": (_I, _I, _I, _I, _F, _P, _P, _P, _P),
}


class Kernels:
    """The library of one build (``load``), its functions on torch tensors."""

    def __init__(self, lib: ctypes.CDLL, variant: str):
        self.lib, self.variant = lib, variant
        for name, arguments in SIGNATURES.items():
            function = getattr(lib, name)
            function.argtypes, function.restype = list(arguments), None

    def tanh_gelu(self, x: torch.Tensor, y: torch.Tensor, slope: torch.Tensor) -> None:
        """y = GELU_tanh(x), ``slope`` its derivative (all of x's shape); x is left as it was."""
        self.lib.fastllc_tanh_gelu(x.numel(), *_pointers(x, y, slope))

    def layer_norm(self, x, gain, bias, eps: float, out, mean, rstd) -> None:
        """LayerNorm of x [C, N, D] with chain c's gain and bias [C, D] into ``out``; mean and 1/√(var + ε) [C, N]."""
        C, N, D = x.shape
        self.lib.fastllc_layer_norm(C, N, D, *_pointers(x, gain, bias), eps, *_pointers(out, mean, rstd))

    def layer_norm_backward(self, grad_out, x, mean, rstd, gain, residual, grad_x, grad_gain, grad_bias) -> None:
        """∇x of ``layer_norm`` plus ``residual`` (or None) into ``grad_x`` (may be ``grad_out``), ∇gain and ∇bias
        [C, D] summed over the tokens."""
        C, N, D = x.shape
        self.lib.fastllc_layer_norm_backward(C, N, D, *_pointers(grad_out, x, mean, rstd, gain, residual, grad_x,
                                                                 grad_gain, grad_bias))

    def causal_attention(self, qkv, heads: int, scaling: float, probs, out) -> None:
        """Causal attention of ``qkv`` [B, T, 3·D] (q | k | v, heads side by side) into ``out`` [B, T, D]; the
        probabilities [B·heads, T, T] kept in ``probs``."""
        B, T, D3 = qkv.shape
        self.lib.fastllc_causal_attention(B, T, heads, D3 // (3 * heads), scaling, *_pointers(qkv, probs, out))

    def causal_attention_backward(self, qkv, heads: int, scaling: float, probs, grad_out, grad_qkv) -> None:
        """∇ of ``causal_attention``'s input [B, T, 3·D] from ∇ of its output [B, T, D]."""
        B, T, D3 = qkv.shape
        self.lib.fastllc_causal_attention_backward(B, T, heads, D3 // (3 * heads), scaling,
                                                   *_pointers(qkv, probs, grad_out, grad_qkv))


@functools.lru_cache(maxsize=None)
def load(which: str) -> Kernels:
    """The kernels built for variant ``which`` (``native_build.variants()``), once per process; NativeUnavailable
    (one line) where they cannot be built or this CPU does not run them."""
    from .. import native_build
    if which not in native_build.variants():
        raise native_build.NativeUnavailable(f"this CPU does not run the {which} build of the transformer kernels "
                                             f"(it runs {', '.join(native_build.variants())})")
    try:
        return Kernels(ctypes.CDLL(str(native_build.build(which, SOURCE))), which)
    except OSError as err:
        raise native_build.NativeUnavailable(f"cannot load the transformer kernels: {err}")


@functools.lru_cache(maxsize=None)
def _default() -> tuple[Kernels | None, str | None]:
    from .. import native_build
    try:
        return load(os.environ.get(native_build.VARIANT_ENV) or native_build.variant()), None
    except native_build.NativeUnavailable as err:
        return None, str(err)


def library() -> Kernels | None:
    """The kernels of the widest build this CPU runs (or ``$FASTLLC_NATIVE_VARIANT``), built and loaded once per
    process; None where they cannot be (``unavailable`` says why)."""
    return _default()[0]


def unavailable() -> str | None:
    """Why the kernels cannot be used here (one line), or None when they load."""
    return _default()[1]


def _pointers(*tensors: torch.Tensor | None) -> list[int | None]:
    """Their data pointers, after checking what the C code assumes: float32, contiguous, on the CPU."""
    for t in tensors:
        if t is not None and (t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu"):
            raise ValueError(f"transformer_cpu kernels take contiguous float32 CPU tensors, got {t.dtype} "
                             f"{'contiguous' if t.is_contiguous() else 'strided'} on {t.device}")
    return [None if t is None else t.data_ptr() for t in tensors]
