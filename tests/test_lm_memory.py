"""fastllc.lm.memory: the per-chain bytes, chains per group within a budget, and chains run in groups one
after another equal to the same chains in one group."""

import pytest
import torch

import fastllc.lm as lm
from fastllc.errors import FastLLCError
from fastllc.lm.memory import activation_bytes_per_token, chain_bytes, forward_bytes_per_token, plan

from lm_models import CONTEXT, gpt2, tokens

SETTINGS = dict(steps=10, batch_size=4, epsilon=1e-4, gamma=1000.0, nbeta=20.0)


def test_chain_bytes_from_the_shapes():
    model = gpt2()  # 2 layers, width 32, 4 heads, MLP 128, vocabulary 32
    d = sum(p.numel() for p in model.parameters())
    per_token = 4 * 2 * (2 * (10 * 32 + 3 * 128 + 3 * 4 * CONTEXT) + 3 * 32)
    assert activation_bytes_per_token(model, CONTEXT) == per_token
    assert chain_bytes(model, 4, CONTEXT) == 4 * d * 5 + 4 * CONTEXT * per_token
    # RMSProp-SGLD keeps V, P and a scratch buffer per chain (its batched update: RMSPropSGLD.state_buffers)
    assert chain_bytes(model, 4, CONTEXT, "rmsprop_sgld") == chain_bytes(model, 4, CONTEXT) + 3 * 4 * d


def test_the_pass_at_w_star_is_counted_without_autograd_unless_it_takes_the_gradient():
    """L_n(w*) alone runs without autograd: a chunk holds one layer's live tensors per token; with ∇L_n(w*)
    (orthogonal) it keeps the chunk's activations as a chain does."""
    model = gpt2()  # width 32, MLP 128, 4 heads, vocabulary 32
    assert forward_bytes_per_token(model, CONTEXT) == 4 * (3 * 32 + 2 * 128 + 2 * 4 * CONTEXT + 3 * 32)
    data = 2 * 8 * 16 * CONTEXT  # inputs and targets, int64
    plain = plan(model, 4, 4, 16, CONTEXT, max_memory=10**12)
    assert plain.shared_bytes == data + 16 * CONTEXT * forward_bytes_per_token(model, CONTEXT)
    full = plan(model, 4, 4, 16, CONTEXT, max_memory=10**12, full_gradient=True)
    assert full.shared_bytes == data + 16 * CONTEXT * activation_bytes_per_token(model, CONTEXT)
    assert lm.memory_plan(model, tokens(16), 4, 4, max_memory=10**12, orthogonal=True) == full


def test_budget_for_is_the_smallest_budget_of_that_group_size():
    probe = plan(gpt2(), 1, 4, 16, CONTEXT, max_memory=10**12)
    for k in (1, 3, 7):
        assert plan(gpt2(), 7, 4, 16, CONTEXT, max_memory=probe.budget_for(k)).per_group == k
    for k in (3, 7):
        assert plan(gpt2(), 7, 4, 16, CONTEXT, max_memory=probe.budget_for(k) - 1).per_group == k - 1
    with pytest.raises(FastLLCError, match="lower batch_size or raise max_memory"):
        plan(gpt2(), 7, 4, 16, CONTEXT, max_memory=probe.budget_for(1) - 1)


def budget_for(model, per_group, sequences=16):
    """max_memory that fits exactly ``per_group`` chains of SETTINGS' minibatch beside the shared bytes (the
    plan fills ``HEADROOM`` of it)."""
    probe = plan(model, 1, SETTINGS["batch_size"], sequences, CONTEXT, max_memory=10**12)
    return probe.budget_for(per_group)


def test_plan_groups_and_refusal():
    model = gpt2()
    chosen = plan(model, 7, 4, 16, CONTEXT, max_memory=budget_for(model, 3))
    assert chosen.per_group == 3 and chosen.groups == [(0, 3), (3, 6), (6, 7)]
    assert "7 chains in 3 group(s) of at most 3" in chosen.describe()
    assert plan(model, 7, 4, 16, CONTEXT, max_memory=10**12).groups == [(0, 7)]
    with pytest.raises(FastLLCError, match="lower batch_size or raise max_memory"):
        plan(model, 7, 4, 16, CONTEXT, max_memory=budget_for(model, 1) - 1)
    assert lm.memory_plan(model, tokens(16), 7, 4, max_memory=budget_for(model, 3)) == chosen


def test_chains_in_groups_equal_one_group():
    model, toks = gpt2(), tokens(16)
    settings = dict(SETTINGS, epsilon=[1e-4, 2e-4, 5e-5, 1e-4, 3e-4])  # per chain: each group gets its own
    one = lm.estimate(model, toks, chains=5, **settings)
    split = lm.estimate(model, toks, chains=5, max_memory=budget_for(model, 2), **settings)
    # chain c keyed by c in both; the vmapped step over 2 chains vs 5 may round differently (equal here)
    torch.testing.assert_close(split.loss_trace, one.loss_trace, rtol=1e-6, atol=1e-6)
    assert split.init_loss == one.init_loss and split.chains == 5
    restricted = lm.estimate(model, toks, chains=3, restrict="l1h0", **SETTINGS)
    restricted_split = lm.estimate(model, toks, chains=3, restrict="l1h0", max_memory=budget_for(model, 1), **SETTINGS)
    torch.testing.assert_close(restricted_split.loss_trace, restricted.loss_trace, rtol=1e-6, atol=1e-6)
    assert restricted_split.sampled_weights == restricted.sampled_weights


def test_head_groups_split_across_memory_groups_equal_one_batch():
    model, toks = gpt2(), tokens(16)
    heads = ["l0h1", "l1h2", "l0 mlp"]
    one = lm.estimate_groups(model, toks, groups=heads, chains=2, **SETTINGS)
    split = lm.estimate_groups(model, toks, groups=heads, chains=2, max_memory=budget_for(model, 4), **SETTINGS)
    for name in heads:  # 6 chains as 4 + 2: group 'l1h2' straddles the two
        torch.testing.assert_close(split[name].loss_trace, one[name].loss_trace, rtol=1e-6, atol=1e-6)
        assert split[name].sampled_weights == one[name].sampled_weights
