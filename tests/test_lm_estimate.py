"""fastllc.lm.estimate / estimate_groups end to end on tiny models: L_n(w*), the model left as it was, a
restricted run keeping every other weight at w* bit for bit, per-head groups equal to the single-group runs,
and the batched (generic) chains equal the one-at-a-time (reference) chains."""

import pytest
import torch
from torch.utils.data import DataLoader

import fastllc.lm as lm
from fastllc.backends import sample
from fastllc.lm.api import PREFIX
from fastllc.sampling import SGLDConfig
from fastllc.sampling.restrict import selection_mask

from lm_models import gpt2, neox, tokens

SETTINGS = dict(steps=12, batch_size=4, epsilon=1e-4, gamma=1000.0, nbeta=20.0)


def test_estimate_records_the_loss_at_w_star_and_leaves_the_model_as_it_was():
    model, toks = gpt2(resid_pdrop=0.3), tokens(20)
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = lm.estimate(model, toks, chains=2, **SETTINGS)
    assert model.training and model.config._attn_implementation == "sdpa"
    assert type(model.transformer.h[0].mlp.act).__name__ == "NewGELUActivation"
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    model.eval()
    with torch.no_grad():
        all_loss = model(input_ids=toks, labels=toks).loss.item()
        first_loss = model(input_ids=toks[:5], labels=toks[:5]).loss.item()
    # fused vs spelt-out GELU and eager vs SDPA attention: fp32 rounding of a loss ~3.5
    assert result.init_loss == pytest.approx(all_loss, rel=1e-5)
    assert lm.estimate(model, toks, chains=1, init_sequences=5, **SETTINGS).init_loss == pytest.approx(first_loss, rel=1e-5)
    assert result.chains == 2 and all(h for h in result.healthy)


def test_estimate_takes_a_loader_with_a_mask_and_a_named_restriction():
    toks = tokens(12)
    rows = [{"input_ids": toks[i], "attention_mask": (torch.arange(toks.shape[1]) < 10).long()} for i in range(12)]
    result = lm.estimate(neox(), DataLoader(rows, batch_size=4), chains=2, restrict="l1h2", **SETTINGS)
    assert result.sampled_weights == 3 * 32 * 8 + 3 * 8 + 8 * 32
    assert result.llc_per_chain[0] is not None


def test_restricted_chains_keep_every_other_weight_at_w_star_exactly():
    model, toks = gpt2(), tokens(16)
    wrapped, data = lm.CausalLM(model), lm.token_data(toks)
    mask = selection_mask(wrapped, {PREFIX + k: v for k, v in lm.name_mask(model, ["l0h1", "l1 mlp"]).items()})
    config = SGLDConfig(chains=3, **SETTINGS)
    w_star = torch.cat([p.detach().reshape(-1) for p in wrapped.parameters()])
    with lm.sampling_mode(model):
        samples = sample(wrapped, *data.pair, lm.next_token_loss, config, backend="generic", restrict=mask)
    final = samples.final_params
    assert torch.equal(final[:, ~mask], w_star[~mask].expand(3, -1))
    assert (final[:, mask] != w_star[mask]).float().mean() > 0.99


def test_per_head_groups_in_one_batch_equal_each_groups_own_run():
    model, toks = gpt2(), tokens(16)
    heads = ["l0h0", "l1h3", "l1 mlp"]
    together = lm.estimate_groups(model, toks, groups=heads, chains=2, **SETTINGS)
    for g, name in enumerate(heads):
        alone = lm.estimate(model, toks, restrict=name, chains=2 * len(heads), **SETTINGS)
        own = alone.llc_per_chain[2 * g:2 * g + 2]
        # chain j of group g is chain 2g+j of a restricted run of all the chains: same randomness key, same
        # trajectory; the vmapped step may block its sums differently by batch size, so fp32 rounding
        assert together[name].llc_per_chain == pytest.approx(own, rel=1e-4, abs=1e-3)
        assert together[name].sampled_weights == alone.sampled_weights


def test_batched_chains_equal_one_at_a_time_chains():
    model, toks = gpt2(), tokens(16)
    batched = lm.estimate(model, toks, chains=3, **SETTINGS)
    one_by_one = lm.estimate(model, toks, chains=3, backend="reference", **SETTINGS)
    # the same randomness per chain; bmm over chains against per-chain mm: fp32 rounding, grown over 12 steps
    torch.testing.assert_close(batched.loss_trace, one_by_one.loss_trace, rtol=1e-4, atol=1e-4)
