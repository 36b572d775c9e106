"""TransformerLens HookedTransformers in fastllc.lm: part names → masks on TransformerLens's own parameters (a
head is an index along the head axis), the same weights as the equivalent GPT-2's names select, and λ̂ of a
HookedTransformer equal to λ̂ of its GPT-2 twin (the same function, the same weights, the same noise)."""

import functools

import pytest
import torch
import torch.nn.functional as F

import fastllc.lm as lm
from fastllc.errors import FastLLCError

from lm_models import fit, gpt2_from_hooked, gpt2_tensors_from_hooked, hooked, tokens

SETTINGS = dict(steps=12, batch_size=4, epsilon=1e-4, gamma=1000.0, nbeta=20.0)
HEAD_AXIS = ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V")  # [heads, ...]: head h is index h along dim 0


def _complete(model, masks):
    """``masks`` with an all-False mask for every parameter it leaves out."""
    return {n: masks.get(n, torch.zeros(p.shape, dtype=torch.bool)) for n, p in model.named_parameters()}


def test_a_head_is_its_index_along_every_head_axis_of_its_layer():
    model = hooked()
    masks = lm.name_mask(model, "l1h2")
    assert sorted(masks) == sorted(f"blocks.1.attn.{name}" for name in HEAD_AXIS)
    for name, mask in masks.items():
        expected = torch.zeros(mask.shape, dtype=torch.bool)
        expected[2] = True
        assert torch.equal(mask, expected), name
    d_model, d_head = 32, 8
    assert sum(int(m.sum()) for m in masks.values()) == 4 * d_model * d_head + 3 * d_head


def test_grouped_query_heads_share_their_key_value_head():
    model = hooked(n_key_value_heads=2)  # keys and values as _W_K/_W_V [2, d_model, d_head]
    masks = lm.name_mask(model, "l0h3")
    assert {"blocks.0.attn._W_K", "blocks.0.attn._W_V", "blocks.0.attn.W_Q"} <= set(masks)
    kv = masks["blocks.0.attn._W_K"]
    assert kv[1].all() and not kv[0].any()  # query head 3 reads key-value head 3 // (4 / 2) = 1
    assert masks["blocks.0.attn.W_Q"][3].all() and int(masks["blocks.0.attn.W_Q"].sum()) == 32 * 8


@pytest.mark.parametrize("name", ["l0h0", "l1h3", ["l0h1", "l1h2"], "l0 attn", "l1 mlp", "l0", "embed", "unembed"])
def test_names_select_the_weights_the_equivalent_gpt2_names_select(name):
    model = hooked()
    twin = gpt2_from_hooked(model)
    ours = gpt2_tensors_from_hooked(_complete(model, lm.name_mask(model, name)), layers=2)
    theirs = _complete(twin, lm.name_mask(twin, name))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[n], theirs[n]) for n in ours), [n for n in ours if not torch.equal(ours[n], theirs[n])]
    b_U = lm.name_mask(model, name).get("unembed.b_U")  # no GPT-2 counterpart: part of "unembed" only
    assert (b_U is not None and bool(b_U.all())) == (name == "unembed")


def test_names_out_of_range_are_refused_in_one_line():
    model = hooked()
    with pytest.raises(FastLLCError, match="layers 0 to 1"):
        lm.name_mask(model, "l2h0")
    with pytest.raises(FastLLCError, match="heads 0 to 3"):
        lm.name_mask(model, "l0h4")


def test_lambda_of_a_hooked_transformer_equals_that_of_its_gpt2_twin():
    """The two models compute the same function (logits to fp32 rounding), and "l0 mlp" is the same tensors at the
    same offsets of the flat weight vector in both (every earlier tensor has the same size in the two layouts), so
    the chains draw the same noise and minibatches: λ̂ agrees chain by chain to the rounding of two
    implementations of one function, compounded over the steps."""
    data = tokens(32)
    model = hooked()
    model.unembed.b_U.requires_grad_(False)  # GPT-2 has no unembedding bias: keep it at zero
    fit(model, data, steps=60)
    model.unembed.b_U.requires_grad_(True)
    twin = gpt2_from_hooked(model)
    settings = dict(chains=2, restrict="l0 mlp", backend="generic", **dict(SETTINGS, steps=30))
    ours, theirs = lm.estimate(model, data, **settings), lm.estimate(twin, data, **settings)
    assert ours.backend == "generic" and ours.sampled_weights == theirs.sampled_weights == 2 * 32 * 128 + 128 + 32
    assert ours.init_loss == pytest.approx(theirs.init_loss, rel=1e-6)  # measured: equal
    # measured: per-chain λ̂ within 1.7e-7 relative, loss traces within 6.4e-7; 1e-5 leaves room for another
    # machine's BLAS blocking, and is far below any difference a wrong mapping or mask would make
    assert ours.llc_per_chain == pytest.approx(theirs.llc_per_chain, rel=1e-5)


def test_per_head_groups_run_and_the_model_is_left_as_it_was():
    model = hooked()
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    groups = lm.estimate_groups(model, tokens(16), groups="per-head", chains=1, **dict(SETTINGS, steps=4))
    assert list(groups) == [f"l{l}h{h}" for l in range(2) for h in range(4)]
    assert all(r.sampled_weights == 4 * 32 * 8 + 3 * 8 for r in groups.values())
    assert model.training and model.blocks[0].mlp.act_fn.__name__ == "gelu_new"  # the fused GELU swapped back
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_the_transformer_backend_names_why_it_does_not_run_a_hooked_transformer():
    model = hooked()
    result = lm.estimate(model, tokens(8), chains=1, **dict(SETTINGS, steps=2))
    assert result.backend == "generic"  # auto
    with pytest.raises(FastLLCError, match="HookedTransformer"):
        lm.estimate(model, tokens(8), chains=1, backend="transformer", **dict(SETTINGS, steps=2))
    assert lm.memory_plan(model, tokens(8), chains=4, batch_size=4).groups == [(0, 4)]


def test_bf16_runs_on_a_hooked_transformer():
    model, data = hooked(), tokens(16)
    fp32, bf16 = (lm.estimate(model, data, chains=2, bf16=flag, **SETTINGS) for flag in (False, True))
    assert bf16.init_loss != fp32.init_loss and bf16.init_loss == pytest.approx(fp32.init_loss, rel=2e-3)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def _ops_of(forward) -> set[str]:
    """The aten ops one call of ``forward`` runs (torch's profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        forward()
    return {event.key for event in profile.key_averages()}


def test_sampling_mode_swaps_transformer_lens_gelu_new_for_the_fused_kernel():
    """Inside ``sampling_mode`` every MLP's ``act_fn`` is the one-kernel tanh-GELU and the forward runs it (one
    aten::gelu per layer, no aten::tanh); outside, TransformerLens's ``gelu_new`` (seven element-wise ops,
    one of them tanh) is back; the two give the same logits to fp32 rounding."""
    model, data = hooked(), tokens(4)
    causal = lm.CausalLM(model)
    with torch.no_grad():
        before, ops = causal(data), _ops_of(lambda: causal(data))
        with lm.sampling_mode(model):
            for block in model.blocks:
                fn = block.mlp.act_fn
                assert isinstance(fn, functools.partial) and fn.func is F.gelu
                assert fn.keywords == {"approximate": "tanh"}
            during, fused_ops = causal(data), _ops_of(lambda: causal(data))
    assert "aten::tanh" in ops and "aten::gelu" not in ops
    assert "aten::gelu" in fused_ops and "aten::tanh" not in fused_ops
    assert all(block.mlp.act_fn.__name__ == "gelu_new" for block in model.blocks)
    torch.testing.assert_close(during, before, rtol=1e-5, atol=1e-5)  # |Δ| ≲ 1e-6 relative per activation
    with lm.sampling_mode(model, fused_gelu=False):
        assert all(block.mlp.act_fn.__name__ == "gelu_new" for block in model.blocks)


def test_each_forward_runs_on_the_tokens_device_whatever_cfg_device_says():
    """TransformerLens moves the tokens and, before every block, the residual stream to ``cfg.device``, so a
    CPU-built model whose chains run on CUDA (``device="cuda"``: the weights copied there) computed on two devices.
    Each forward now sets ``cfg.device`` to the tokens' device and restores it. Here the mirror case, testable on
    the CPU: a model whose ``cfg`` names CUDA evaluated with CPU weights and tokens (before: moved to CUDA)."""
    model, data = hooked(), tokens(16)
    with torch.no_grad():
        expected = lm.CausalLM(model)(data)
    model.cfg.device = "cuda"
    seen = []
    record = lambda x, hook: seen.append((model.cfg.device, x.device))  # before block 1, after a device move
    with model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", record)]):
        with torch.no_grad():
            assert torch.equal(lm.CausalLM(model)(data), expected)
    assert seen == [("cpu", torch.device("cpu"))] and model.cfg.device == "cuda"
    result = lm.estimate(model, data, chains=2, **SETTINGS)  # the chains under vmap, L_n(w*) included
    assert model.cfg.device == "cuda"
    model.cfg.device = "cpu"
    assert result.llc_per_chain == lm.estimate(model, data, chains=2, **SETTINGS).llc_per_chain
