"""The fused CPU passes of GPT-2's written-out step (``fastllc/kernels/transformer_cpu.cpp`` through
``fastllc/engines/transformer_cpu.py``), every build this CPU runs, against the torch operations they replace computed
in float64: the tanh-GELU and its slope, layer norm with per-chain gain and bias and its backward, causal attention from
the fused q | k | v and its backward, on awkward shapes (widths and lengths that are not multiples of the vector
width); a NaN reaches the outputs; every output element is written; where the kernels cannot be built, the engine
runs ATen's operations.

Tolerances, in float32 ulps (eps) of the largest reference value (or of max(1, |y|) for GELU, as TanhGELU's test):
each output is a float32 expression or a sum of at most T or D float32 products taken in another order than
float64's. Measured worst cases: GELU value 0.05, slope 23 (σ + x·σ(1 − σ)·2u' cancels for negative x, as
TanhGELU's 17); layer norm 1.2 forward and backward; attention 1.6 forward, 2.2 backward. The bounds (GELU 2 and
32, as TanhGELU's; 8 elsewhere) leave room for other draws, and a wrong term (a key past the diagonal, a missed
scale, a padding lane counted) moves some output by orders of magnitude more."""

import math

import pytest
import torch
import torch.nn.functional as F

from fastllc import native_build
from fastllc.engines import transformer_cpu

EPS = torch.finfo(torch.float32).eps
BUILDS = native_build.variants()


@pytest.fixture(params=BUILDS, scope="module")
def kernels(request):
    try:
        return transformer_cpu.load(request.param)
    except native_build.NativeUnavailable as err:
        pytest.skip(f"the {request.param} build cannot be built here: {err}")


def dirty_scratch(kernels):
    """Leave NaN and −inf in the kernels' per-thread scratch (the attention's masked scores of a NaN sequence): no
    kernel may read a padding lane it did not write. The engine calls them one after another on one thread."""
    qkv = torch.full((1, 70, 3 * 70), math.nan)
    kernels.causal_attention(qkv, 1, 1.0, torch.empty(1, 70, 70), torch.empty(1, 70, 70))
    kernels.causal_attention_backward(qkv, 1, 1.0, torch.full((1, 70, 70), math.nan), torch.full((1, 70, 70), math.nan),
                                      torch.empty(1, 70, 210))


def ulps(ours: torch.Tensor, exact: torch.Tensor) -> float:
    """|ours − exact| in float32 ulps of the largest |exact|."""
    return float((ours.double() - exact).abs().max() / exact.abs().max() / EPS)


def test_tanh_gelu_and_its_slope(kernels):
    dirty_scratch(kernels)
    x = torch.cat([torch.linspace(-12, 12, 20001), 0.3 * torch.randn(10007), torch.tensor([-100.0, 100.0])])
    y, slope = torch.empty_like(x), torch.empty_like(x)
    kept = x.clone()
    kernels.tanh_gelu(x, y, slope)
    exact = x.double().requires_grad_()
    y64 = F.gelu(exact, approximate="tanh")
    (slope64,) = torch.autograd.grad(y64.sum(), exact)
    scale = y64.detach().abs().clamp(min=1)
    assert float(((y.double() - y64.detach()).abs() / scale).max()) <= 2 * EPS
    assert float(((slope.double() - slope64).abs() / scale).max()) <= 32 * EPS
    assert torch.equal(x, kept)
    nan = torch.tensor([1.0, float("nan"), 2.0])
    out = torch.empty(3), torch.empty(3)
    kernels.tanh_gelu(nan, *out)
    assert out[0][1].isnan() and out[1][1].isnan() and out[0][[0, 2]].isfinite().all()


@pytest.mark.parametrize("D,N,spread", [(64, 45, 2.0), (37, 45, 2.0), (5, 45, 2.0), (5, 300, 1e-3)])
def test_layer_norm_forward_and_backward(kernels, D, N, spread):
    """Against float64, within 8 ulps or twice ATen's own float32 error on the same data, whichever is larger: rows
    of spread 1e-3 about 0.5 lose ~250 ulps to cancellation in x − μ in any float32 code (ATen's too); many of them
    with 1/√(var + ε) ≈ 1,000 would also overflow a padding lane carried from row to row."""
    g = torch.Generator().manual_seed(D)
    C = 3
    x = torch.randn(C, N, D, generator=g) * spread + 0.5
    gain, bias = torch.randn(C, D, generator=g), torch.randn(C, D, generator=g)
    out, mean, rstd = torch.empty_like(x), torch.empty(C, N), torch.empty(C, N)
    dirty_scratch(kernels)
    kernels.layer_norm(x, gain, bias, 1e-5, out, mean, rstd)
    exact, exact_grads = affine_layer_norm(x, gain, bias, torch.float64)
    aten, aten_grads = affine_layer_norm(x, gain, bias, torch.float32)
    assert ulps(out, exact.detach()) <= max(8, 2 * ulps(aten.detach(), exact.detach()))

    grad_out, residual = torch.randn(C, N, D, generator=g), torch.randn(C, N, D, generator=g)
    grad_x, grad_gain, grad_bias = torch.full_like(x, math.nan), torch.full((C, D), math.nan), torch.full((C, D), math.nan)
    dirty_scratch(kernels)
    kernels.layer_norm_backward(grad_out, x, mean, rstd, gain, residual, grad_x, grad_gain, grad_bias)
    exact_grads, aten_grads = exact_grads(grad_out), aten_grads(grad_out)
    for ours, right, theirs in zip((grad_x - residual, grad_gain, grad_bias), exact_grads, aten_grads):
        assert ulps(ours, right) <= max(8, 2 * ulps(theirs, right))
    in_place = grad_out.clone()  # ∇x written over ∇out, without a residual
    kernels.layer_norm_backward(in_place, x, mean, rstd, gain, None, in_place, grad_gain, grad_bias)
    assert ulps(in_place, exact_grads[0]) <= max(8, 2 * ulps(aten_grads[0], exact_grads[0]))


def affine_layer_norm(x, gain, bias, dtype):
    """torch's layer norm with per-chain gain and bias in ``dtype``: (output, ∇out ↦ (∇x, ∇gain, ∇bias))."""
    x, gain, bias = (t.to(dtype).requires_grad_() for t in (x, gain, bias))
    out = F.layer_norm(x, x.shape[-1:], eps=1e-5) * gain[:, None] + bias[:, None]
    return out, lambda grad: torch.autograd.grad(out, (x, gain, bias), grad.to(dtype), retain_graph=True)


def reference_attention(qkv: torch.Tensor, heads: int, scaling: float):
    """The engine's ATen attention (``transformer_ops.attend``'s operations) in float64: (probabilities, output)."""
    B, T, D3 = qkv.shape
    q, k, v = qkv.view(B, T, 3, heads, D3 // (3 * heads)).permute(2, 0, 3, 1, 4)
    mask = torch.full((T, T), float("-inf"), dtype=qkv.dtype).triu(1)
    probs = (scaling * (q @ k.transpose(-1, -2)) + mask).softmax(-1)
    return probs.reshape(B * heads, T, T), (probs @ v).transpose(1, 2).reshape(B, T, D3 // 3)


@pytest.mark.parametrize("B,T,heads,d", [(5, 32, 4, 16), (3, 13, 2, 8), (2, 19, 3, 20), (2, 1, 2, 4), (1, 40, 1, 64),
                                         (2, 11, 2, 40)])  # d = 40: no build's register-tiled widths
def test_causal_attention_forward_and_backward(kernels, B, T, heads, d):
    g = torch.Generator().manual_seed(T * d)
    qkv = torch.randn(B, T, 3 * heads * d, generator=g)
    scaling = d ** -0.5
    probs, out = torch.full((B * heads, T, T), math.nan), torch.full((B, T, heads * d), math.nan)
    dirty_scratch(kernels)
    kernels.causal_attention(qkv, heads, scaling, probs, out)
    qkv64 = qkv.double().requires_grad_()
    exact_probs, exact_out = reference_attention(qkv64, heads, scaling)
    assert ulps(probs, exact_probs.detach()) <= 8 and ulps(out, exact_out.detach()) <= 8
    above = torch.ones(T, T, dtype=torch.bool).triu(1).expand_as(probs)
    assert torch.equal(probs[above], torch.zeros_like(probs[above]))  # exactly 0: no key after the query

    grad_out = torch.randn(B, T, heads * d, generator=g)
    grad_qkv = torch.full_like(qkv, math.nan)  # every element must be written
    dirty_scratch(kernels)
    kernels.causal_attention_backward(qkv, heads, scaling, probs, grad_out, grad_qkv)
    (exact,) = torch.autograd.grad(exact_out, qkv64, grad_out.double())
    assert ulps(grad_qkv, exact) <= 8


@pytest.mark.parametrize("part", ["query", "key", "value"])
def test_a_nan_in_a_sequence_reaches_its_outputs_and_no_other(kernels, part):
    """A NaN query, key or value of sequence 1 (head 0, position 4) makes NaN what depends on it, forward (the
    query's own row; every later row of a key or value) and backward (the whole sequence's gradient), and nothing
    of sequences 0 and 2."""
    B, T, heads, d = 3, 9, 2, 4
    qkv = torch.randn(B, T, 3 * heads * d)
    qkv[1, 4, ["query", "key", "value"].index(part) * heads * d] = math.nan
    probs, out = torch.empty(B * heads, T, T), torch.empty(B, T, heads * d)
    kernels.causal_attention(qkv, heads, 0.5, probs, out)
    assert out[1, 4, :d].isnan().any() and out[[0, 2]].isfinite().all()
    grad_qkv = torch.empty_like(qkv)
    kernels.causal_attention_backward(qkv, heads, 0.5, probs, torch.randn(B, T, heads * d), grad_qkv)
    assert grad_qkv[1].isnan().any() and grad_qkv[[0, 2]].isfinite().all()


def test_a_nan_or_an_overflowing_row_makes_the_layer_norm_nan(kernels):
    """NaN in, NaN out (forward and backward); a row so large that its variance overflows is NaN too, not its bias
    (1/√inf = 0 would leave a finite loss and a zero gradient: a diverging chain hidden)."""
    C, N, D = 2, 5, 37
    x = torch.randn(C, N, D)
    x[0, 1, 3], x[1, 2] = math.nan, x[1, 2] * 1e37
    gain, bias = torch.randn(C, D), torch.randn(C, D)
    out, mean, rstd = torch.empty_like(x), torch.empty(C, N), torch.empty(C, N)
    kernels.layer_norm(x, gain, bias, 1e-5, out, mean, rstd)
    assert out[0, 1].isnan().all() and out[1, 2].isnan().all()
    fine = torch.ones(C, N, dtype=torch.bool)
    fine[0, 1] = fine[1, 2] = False
    assert out[fine].isfinite().all()
    grad_x, grad_gain, grad_bias = torch.empty_like(x), torch.empty(C, D), torch.empty(C, D)
    kernels.layer_norm_backward(torch.randn(C, N, D), x, mean, rstd, gain, None, grad_x, grad_gain, grad_bias)
    assert grad_x[0, 1].isnan().all() and grad_x[1, 2].isnan().all() and grad_x[fine].isfinite().all()
    assert grad_gain.isnan().any(dim=1).all()  # each chain's sum over its tokens


def test_tensors_the_kernels_cannot_read_are_refused(kernels):
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match="contiguous float32"):
        kernels.tanh_gelu(x.t(), torch.empty(6, 4), torch.empty(6, 4))
    with pytest.raises(ValueError, match="contiguous float32"):
        kernels.tanh_gelu(x.double(), torch.empty(4, 6), torch.empty(4, 6))


def test_without_a_compiler_the_engine_runs_atens_operations(monkeypatch, tmp_path):
    """No compiler: ``library()`` is None with the reason in one line, and the GPT-2 engine takes ATen's path."""
    import fastllc.lm as lm
    from fastllc.engines import transformer as engine
    from fastllc.sampling.contract import flat_parameters
    from lm_models import gpt2

    monkeypatch.setenv("FASTLLC_CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("FASTLLC_HOME", str(tmp_path / "home"))  # nothing cached there
    transformer_cpu._default.cache_clear()
    transformer_cpu.load.cache_clear()
    try:
        assert transformer_cpu.library() is None
        assert "no-such-compiler" in transformer_cpu.unavailable() and "\n" not in transformer_cpu.unavailable()
        model = lm.CausalLM(gpt2()).eval()
        assert engine.build(model, flat_parameters(model)[0]).kernels is None
    finally:
        transformer_cpu._default.cache_clear()
        transformer_cpu.load.cache_clear()
