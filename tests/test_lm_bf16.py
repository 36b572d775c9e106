"""bf16 autocast in fastllc.lm (``estimate(..., bf16=True)``): the forward and backward passes in bfloat16, the
weights, their gradients, the noise and the update in float32, and λ̂ close to float32's."""

import pytest
import torch

import fastllc.lm as lm
from fastllc.errors import FastLLCError

from lm_models import fit, gpt2, tokens


def test_the_autocast_forward_gives_float32_logits_and_gradients_near_float32s():
    model, data = gpt2(), tokens(8)
    plain, autocast = lm.CausalLM(model), lm.CausalLM(model, autocast=torch.bfloat16)
    with lm.sampling_mode(model):
        exact, rounded = plain(data), autocast(data)
        rounded.sum().backward()
    assert rounded.dtype == torch.float32 and all(p.grad.dtype == torch.float32 for p in model.parameters())
    # bf16 keeps 8 significant bits (relative rounding 2⁻⁹ ≈ 0.2% per operation): the logits move, but by
    # a few such roundings of their own size, not more
    assert not torch.equal(exact, rounded)
    assert (rounded - exact).abs().max() <= 0.02 * exact.abs().max()


def test_bf16_lambda_is_within_a_fraction_of_its_standard_error_of_float32s():
    """Same seed, so the same minibatches and noise: the two runs differ only by bf16 rounding in the losses and
    gradients. Measured here (4 chains × 40 steps, nβ 100, seeds 0-2): λ̂ 62.7-66.5, bf16 above fp32 by
    0.001-0.010 (≤ 0.02 of the standard error across chains), per chain within 5.8e-4 relative; on 64 sequences,
    100 steps: λ̂ 97.6-98.9, +0.03-0.05 (≤ 0.09 SE), and at nβ 1000, +0.30-0.34 (0.16% of λ̂, 0.07-0.19 SE).
    The tolerance, a quarter of the standard error, is a shift a user could not tell from the chains' own noise;
    per chain, 5e-3 is ten times the measured spread."""
    data = tokens(32)
    model = fit(gpt2(), data, steps=100)
    settings = dict(chains=4, steps=40, batch_size=8, epsilon=1e-4, gamma=1000.0, nbeta=100.0, seed=0)
    fp32, bf16 = lm.estimate(model, data, **settings), lm.estimate(model, data, bf16=True, **settings)
    assert bf16.backend == "generic" and fp32.backend == "transformer"  # auto: the transformer engine is fp32-only
    assert bf16.init_loss != fp32.init_loss and bf16.init_loss == pytest.approx(fp32.init_loss, rel=2e-3)
    assert abs(bf16.llc_mean - fp32.llc_mean) < 0.25 * fp32.llc_se
    assert bf16.llc_per_chain == pytest.approx(fp32.llc_per_chain, rel=5e-3)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_bf16_is_refused_by_the_float32_transformer_backend_in_one_line():
    with pytest.raises(FastLLCError, match="bf16 autocast runs on backend='generic'"):
        lm.estimate(gpt2(), tokens(8), chains=1, steps=2, batch_size=4, bf16=True, backend="transformer")
    with pytest.raises(FastLLCError, match="bf16 must be"):
        lm.estimate(gpt2(), tokens(8), chains=1, steps=2, batch_size=4, bf16="yes")


def test_a_bf16_series_follows_each_checkpoints_own_bf16_run():
    models, data = [gpt2(), gpt2()], tokens(16)
    settings = dict(chains=2, steps=10, batch_size=4, epsilon=1e-4, gamma=1000.0, nbeta=20.0, bf16=True)
    series = lm.estimate_series(models, data, **settings)
    for model, point in zip(models, series):
        alone = lm.estimate(model, data, backend="generic", **settings)
        assert point.result.init_loss == alone.init_loss  # L_n(w*) in bf16 in both
        # w*_k + δ rounded where a lone run accumulates w, and bf16 products of those slightly different weights:
        # measured 1.9e-4 at most on losses of 3.5; 2e-3 is ten times that, still a tenth of one bf16 rounding
        # of the loss (2⁻⁸·3.5 = 0.014)
        torch.testing.assert_close(point.result.loss_trace, alone.loss_trace, rtol=2e-3, atol=2e-3)
