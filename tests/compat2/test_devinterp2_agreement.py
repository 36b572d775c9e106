"""fastllc.compat.devinterp2 against real devinterp 2.0.1, which cannot share an environment with devinterp
1.3.2 (the main suite's): .ci/run builds build/venv-devinterp2 (torch 2.13.0, devinterp==2.0.1, fastllc -e)
and runs this folder there; the README's test command does not collect it (pyproject's norecursedirs).

On a tiny GPT-2 trained for a few seconds: the same settings give the same L̂_n(w*) and the same loss at the
first step (the same minibatches, before any noise) to fp32 rounding, with a custom loss_fn too, and λ̂ within 3
combined standard errors (the SGLD noise streams differ), on a TransformerLens HookedTransformer too (devinterp runs
it as model(input_ids)); create_param_masks selects devinterp's elements on GPT-2, GPT-NeoX, a grouped-query Llama
and multi-head and grouped-query HookedTransformers for every head, group and part name."""

import math
import warnings
from importlib.metadata import version

import numpy as np
import pytest
import torch

if version("devinterp") != "2.0.1":
    raise RuntimeError(f"tests/compat2 compares with devinterp 2.0.1, found devinterp {version('devinterp')}: run it "
                       "in build/venv-devinterp2 (.ci/run builds it)")
from datasets import Dataset  # noqa: E402
from devinterp.slt.llc import llc as devinterp_llc  # noqa: E402
from devinterp.slt.weight_restrictions import create_param_masks as devinterp_masks  # noqa: E402

from fastllc.compat.devinterp2 import create_param_masks, llc  # noqa: E402
from lm_models import VOCAB, fit, gpt2, hooked, llama, neox  # noqa: E402

SETTINGS = dict(lr=3e-4, n_beta=30.0, num_chains=8, num_draws=50, num_burnin_steps=10, batch_size=16,
                localization=100.0, num_init_loss_batches=4)


def sequences(n=128, length=16, seed=0):
    """Arithmetic progressions mod VOCAB (a start and a step per sequence): learnable in 150 Adam steps."""
    g = torch.Generator().manual_seed(seed)
    start, step = torch.randint(0, VOCAB, (n, 1), generator=g), torch.randint(1, 4, (n, 1), generator=g)
    return (start + step * torch.arange(length)) % VOCAB


def trained(dropout: float):
    torch.manual_seed(0)
    model, tokens = gpt2(resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout), sequences()
    fit(model, tokens)
    return model, Dataset.from_dict({"input_ids": tokens.tolist()}).with_format("torch")


@pytest.fixture(scope="module")
def gpt2_trained():
    return trained(0.0)


def both(model, dataset, **settings):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # devinterp's "sampling without output_path" and nβ warnings
        theirs = devinterp_llc(model, dataset, {}, **settings)
    ours = llc(model, dataset, {}, **settings)
    return theirs, ours


def assert_llc_agrees(theirs, ours):
    se = [float(np.std(r.llc_per_chain.values, ddof=1)) / math.sqrt(r.sizes["chain"]) for r in (theirs, ours)]
    gap = abs(float(theirs.llc_mean) - float(ours.llc_mean))
    print(f"λ̂ devinterp {float(theirs.llc_mean):.3f} ± {se[0]:.3f}, fastllc {float(ours.llc_mean):.3f} ± {se[1]:.3f}: "
          f"{gap / math.hypot(*se):.2f} combined se apart")
    assert gap <= 3 * math.hypot(*se)


def test_same_result_structure_loss_at_w_star_first_minibatch_and_llc(gpt2_trained):
    theirs, ours = both(*gpt2_trained, **SETTINGS)
    for name, variable in theirs.data_vars.items():
        assert ours[name].dims == variable.dims and ours[name].dtype == variable.dtype, name
    assert ours.sizes == theirs.sizes and not ours.coords and not theirs.coords
    assert float(ours.init_loss) == pytest.approx(float(theirs.init_loss), rel=1e-5)
    # step 0 is the loss at w* on the first minibatch, before any noise: devinterp's minibatch, every chain
    np.testing.assert_allclose(ours.loss_trace.values[:, 0], theirs.loss_trace.values[:, 0], rtol=1e-5)
    assert_llc_agrees(theirs, ours)


def test_restricted_rmsprop_with_per_chain_minibatches_and_accumulation(gpt2_trained):
    model, dataset = gpt2_trained
    settings = dict(SETTINGS, lr=3e-5, sampling_method="rmsprop_sgld", match_sampling_input_ids_across_chains=False,
                    gradient_accumulation_steps=2, batch_size=8, num_chains=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = devinterp_llc(model, dataset, {}, param_masks=devinterp_masks(model, "l1h2"), **settings)
    ours = llc(model, dataset, {}, param_masks=create_param_masks(model, "l1h2"), **settings)
    assert float(ours.init_loss) == pytest.approx(float(theirs.init_loss), rel=1e-5)
    first = theirs.loss_trace.values[:, 0]
    assert len(set(first.round(6))) > 1  # each chain its own order (seed init_seed + chain)
    np.testing.assert_allclose(ours.loss_trace.values[:, 0], first, rtol=1e-5)
    assert_llc_agrees(theirs, ours)


def test_llc_with_dropout_in_training_mode():
    theirs, ours = both(*trained(0.1), **dict(SETTINGS, num_chains=6))
    assert float(ours.init_loss) == pytest.approx(float(theirs.init_loss), rel=0.05)  # one dropout draw each
    assert_llc_agrees(theirs, ours)


def test_llc_on_a_hooked_transformer():
    """Smaller than the GPT-2 runs (~8 s on one thread, devinterp's 5 of them): 64 sequences, 60 Adam steps, 4
    chains of 50 steps; on seeds 0-2 the two λ̂ were 0.01-0.20 combined standard errors apart."""
    torch.manual_seed(0)
    tokens = sequences(64)
    model = fit(hooked(), tokens, steps=60)
    dataset = Dataset.from_dict({"input_ids": tokens.tolist()}).with_format("torch")
    theirs, ours = both(model, dataset, **dict(SETTINGS, num_chains=4, num_draws=40))
    assert float(ours.init_loss) == pytest.approx(float(theirs.init_loss), rel=1e-5)
    np.testing.assert_allclose(ours.loss_trace.values[:, 0], theirs.loss_trace.values[:, 0], rtol=1e-5)
    assert_llc_agrees(theirs, ours)


def second_half(model, input_ids):
    """A custom loss_fn: the next-token cross-entropy of the second half of each sequence only."""
    logits = model(input_ids).logits[:, :-1]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")
    return ce * (torch.arange(ce.shape[1]) >= ce.shape[1] // 2)


def test_a_custom_loss_fn_gives_devinterps_loss_at_w_star_and_first_steps(gpt2_trained):
    theirs, ours = both(*gpt2_trained, **dict(SETTINGS, num_chains=2, num_draws=3, num_burnin_steps=0,
                                              loss_fn=second_half))
    assert float(ours.init_loss) == pytest.approx(float(theirs.init_loss), rel=1e-5)
    np.testing.assert_allclose(ours.loss_trace.values[:, 0], theirs.loss_trace.values[:, 0], rtol=1e-5)


RESTRICTIONS = ["full", "l0", "l1 attn", "l0 mlp", "embed", "unembed", "l0 h1", "L1H0", "l1g1",
                ["l0h1", "l1h3"], ["l0h0", "l0 attn"], ["l1h2", "embed"]]


BUILDS = {"gpt2": gpt2, "neox": neox, "llama-gqa": lambda: llama(heads=4, kv_heads=2), "hooked": hooked,
          "hooked-gqa": lambda: hooked(n_key_value_heads=2),
          # heads = kv-heads · d_model/heads: devinterp's "K/V if the axis is kv-heads·d_head or kv-heads long" rule
          # then reads W_Q's head axis as a K/V one too (a head selects its group's query heads); matched, not fixed
          "hooked-gqa-narrow": lambda: hooked(width=8, n_key_value_heads=2)}


@pytest.mark.parametrize("build", BUILDS.values(), ids=BUILDS.keys())
def test_create_param_masks_selects_devinterps_elements(build):
    model = build()
    heads = model.cfg.n_heads if hasattr(model, "cfg") else model.config.num_attention_heads
    names = RESTRICTIONS + [f"l{l}h{h}" for l in range(2) for h in range(heads)] + [next(iter(dict(model.named_parameters())))]
    for restriction in names:
        theirs, ours = devinterp_masks(model, restriction), create_param_masks(model, restriction)
        assert list(ours) == list(theirs), restriction
        for name, mask in theirs.items():
            assert (ours[name] is None) == (mask is None), (restriction, name)
            if mask is not None:
                assert ours[name].shape == mask.shape and torch.equal(ours[name], mask), (restriction, name)
