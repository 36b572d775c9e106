"""fastllc.lm.models: the adapter's logits, loading a local directory, the sampling mode and its restoration,
and that C chains' weights evaluate under vmap as C separate evaluations would (no loop fallback)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

import fastllc.lm as lm
from fastllc.errors import FastLLCError
from fastllc.lm import CausalLM, FusedTanhGELU, load_causal_lm, sampling_mode
from fastllc.lm import memory
from fastllc.lm.api import TokenLossLM, init_loss_at, mean_token_loss
from fastllc.lm.models import Dimensions, dimensions

from lm_models import gpt2, hooked, llama, neox, tokens

MODELS = {"gpt2": gpt2, "neox": neox, "llama": llama}


@pytest.mark.parametrize("arch", MODELS)
def test_causal_lm_gives_the_models_logits_but_the_last(arch):
    model = MODELS[arch]().eval()
    toks = tokens(3)
    with torch.no_grad():
        assert torch.equal(CausalLM(model)(toks), model(input_ids=toks).logits[:, :-1])


def test_refuses_what_is_not_a_causal_lm(tmp_path):
    with pytest.raises(FastLLCError, match="causal LM"):
        CausalLM(torch.nn.Linear(2, 2))
    with pytest.raises(FastLLCError, match="not a directory"):
        load_causal_lm(str(tmp_path / "missing"))


def test_loads_a_local_save_pretrained_directory(tmp_path):
    model = gpt2().eval()
    model.save_pretrained(tmp_path)
    loaded = load_causal_lm(str(tmp_path)).eval()
    toks = tokens(2)
    with torch.no_grad():  # eager (loaded) and sdpa (built) attention: the same function to fp32 rounding
        torch.testing.assert_close(CausalLM(loaded)(toks), CausalLM(model)(toks), rtol=1e-5, atol=1e-5)


def test_sampling_mode_switches_and_restores_everything():
    model = gpt2(resid_pdrop=0.5)
    model.train()
    model.transformer.h[1].eval()  # a mixed state must come back as it was
    before = {name: m.training for name, m in model.named_modules()}
    implementation = model.config._attn_implementation
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="inside"):
        with sampling_mode(model):
            assert not any(m.training for m in model.modules())  # dropout off
            assert model.config._attn_implementation == "eager"
            assert isinstance(model.transformer.h[0].mlp.act, FusedTanhGELU)
            raise RuntimeError("inside")
    assert {name: m.training for name, m in model.named_modules()} == before
    assert model.config._attn_implementation == implementation
    assert type(model.transformer.h[0].mlp.act).__name__ == "NewGELUActivation"
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_fused_gelu_is_the_same_function_to_fp32_rounding():
    model = gpt2().eval()
    x = torch.randn(7, 13, 33) * 4
    original = model.transformer.h[0].mlp.act
    # seven fp32 element-wise ops against one fused kernel: a few ulps
    torch.testing.assert_close(FusedTanhGELU()(x), original(x), rtol=2e-6, atol=2e-6)
    toks = tokens(4)
    with torch.no_grad():
        plain = CausalLM(model)(toks)
        with sampling_mode(model):
            fast = CausalLM(model)(toks)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", MODELS)
def test_chains_evaluate_under_vmap_as_one_at_a_time(arch):
    """C chains' weights stacked on a leading axis: vmap's batched evaluation equals C functional calls (to
    fp32 rounding: a bmm over chains may block its sums differently from C mm's), without vmap's slow loop
    fallback (its 'batching rule' performance warning) in the sampling mode's attention."""
    model = MODELS[arch]()
    lm, toks = CausalLM(model), tokens(4)
    names = [n for n, _ in lm.named_parameters()]
    C = 3
    stacked = [p.detach() + 0.01 * torch.randn(C, *p.shape) for p in lm.parameters()]
    batches = torch.stack([tokens(4, seed=s) for s in range(C)])
    with sampling_mode(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the fallback announces itself as a UserWarning
        batched = vmap(lambda w, x: functional_call(lm, dict(zip(names, w)), (x,)))(stacked, batches)
        one_by_one = torch.stack([functional_call(lm, dict(zip(names, [w[c] for w in stacked])), (batches[c],))
                                  for c in range(C)])
    torch.testing.assert_close(batched, one_by_one, rtol=1e-5, atol=1e-5)
    assert batched.shape == (C, 4, toks.shape[1] - 1, model.config.vocab_size)


def test_large_batches_run_in_checkpointed_chunks_with_the_same_loss_and_gradient():
    model = gpt2().eval()
    toks = tokens(11)
    whole, chunked = CausalLM(model, chunk=100), CausalLM(model, chunk=4)  # 11 = 4 + 4 + 3
    grads = []
    for lm in (whole, chunked):
        model.zero_grad()
        logits = lm(toks)
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), toks[:, 1:].reshape(-1)).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    with torch.no_grad():  # per-sequence computation: the same batch-of-4 kernels may block differently: rounding
        torch.testing.assert_close(chunked(toks), whole(toks), rtol=1e-6, atol=1e-6)
    for a, b in zip(*grads):  # the sums over sequences are added in another order
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_refuses_a_model_without_a_language_model_head():
    from transformers import GPT2Model
    with pytest.raises(FastLLCError, match="language-model head"):
        CausalLM(GPT2Model(gpt2().config))


def _per_token_cross_entropy(model, ids):
    logits = model(input_ids=ids).logits[:, :-1]
    return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")


def test_a_float64_model_keeps_float64_logits_and_losses():
    """Without autocast nothing is cast: a ``.double()`` model's logits, its custom per-token losses and L_n(w*)
    stay float64 (a cast of the logits to fp32 cost L_m and L_n(w*) about 1e-7 relative, silently)."""
    model, data = gpt2().double().eval(), tokens(8)
    with torch.no_grad():
        exact = model(input_ids=data).logits[:, :-1]
        assert exact.dtype == torch.float64 and torch.equal(CausalLM(model)(data), exact)
        per_token = TokenLossLM(model, _per_token_cross_entropy)(data)
        assert per_token.dtype == mean_token_loss(per_token, None).dtype == torch.float64
    mean = float(F.cross_entropy(exact.transpose(1, 2), data[:, 1:]))
    # float64 end to end: equal to float64 rounding (fp32 logits were ~1e-7 off)
    for module in (CausalLM(model), TokenLossLM(model, _per_token_cross_entropy)):
        assert init_loss_at(module, lm.token_data(data)) == pytest.approx(mean, rel=1e-12)
    result = lm.estimate(model, data, chains=1, steps=2, batch_size=4, nbeta=20.0, backend="generic")
    assert result.init_loss == pytest.approx(mean, rel=1e-12)
    assert CausalLM(gpt2().bfloat16())(data).dtype == torch.float32  # narrower outputs still come back as fp32


@pytest.mark.parametrize("build, expected", [
    (gpt2, Dimensions(layers=2, width=32, heads=4, mlp_width=128, vocab=32, head_width=8, kv_heads=4)),
    (neox, Dimensions(layers=2, width=32, heads=4, mlp_width=128, vocab=32, head_width=8, kv_heads=4)),
    (lambda: llama(kv_heads=2), Dimensions(layers=2, width=32, heads=4, mlp_width=64, vocab=32, head_width=8,
                                           kv_heads=2)),
    (lambda: hooked(n_key_value_heads=2), Dimensions(layers=2, width=32, heads=4, mlp_width=128, vocab=32,
                                                     head_width=8, kv_heads=2)),
], ids=["gpt2", "neox", "llama-gqa", "hooked-gqa"])
def test_dimensions_are_read_from_the_config_once_for_every_reader(build, expected):
    model = build()
    assert dimensions(model) == expected
    assert tuple(memory._shape(model)) == tuple(expected[:5])  # the memory plan's reading agrees
