"""fastllc.observables on a tiny GPT-2 (built from a config): one batched run of three restrictions (full, the
attention of layer 0 and of layer 1) with three probe sets, per-token observables, memory-planned parts, and the
devinterp 2.0.1 layer's results laid out as devinterp's (its source: devinterp/slt/susceptibilities.py
``_build_output``, bif.py ``_compute_correlations``)."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch

import fastllc.observables as obs
from fastllc import conformance
from fastllc.errors import FastLLCError
from fastllc.lm.memory import plan
from lm_models import CONTEXT, gpt2, tokens

SETTINGS = dict(chains=2, steps=6, epsilon=1e-4, gamma=1000.0, nbeta=30.0, batch_size=4, seed=0)
RESTRICTIONS = {"full": None, "l0 attn": "l0 attn", "l1 attn": "l1 attn"}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def _probes():
    return {"task": tokens(4, seed=1), "code": tokens(3, seed=2), "legal": tokens(3, seed=3)}


@pytest.fixture(scope="module")
def lm_run(model):
    masks = {"legal": torch.ones(3, CONTEXT, dtype=torch.bool)}
    masks["legal"][0, 5:] = False  # sequence 0 of 'legal': only its first four tokens count
    return obs.observe_lm(model, tokens(24), _probes(), restrictions=RESTRICTIONS, probe_loss_masks=masks,
                          token_moments=True, **SETTINGS)


def test_one_batched_run_gives_every_restriction_and_per_token_observables(lm_run):
    assert list(lm_run.groups) == list(RESTRICTIONS) and lm_run.groups["l1 attn"] == (4, 6)
    assert lm_run.results["l0 attn"].sampled_weights < lm_run.results["full"].sampled_weights
    chi = obs.compute_susceptibilities(lm_run, "task")
    assert chi.token.shape == (3, 10, CONTEXT - 1) and chi.sets.shape == (3, 3)
    assert chi.sets[:, 0].abs().max() < 1e-12  # the task against itself
    legal0 = lm_run.probes.rows("legal").start
    assert chi.token[:, legal0, 4:].isnan().all() and chi.token[:, legal0, :4].isfinite().all()  # masked: no χ
    bif = obs.compute_bif(lm_run, method="token")
    assert bif.matrix.shape == (10, 10, CONTEXT - 1, CONTEXT - 1)
    assert torch.isnan(bif.matrix[legal0, legal0, 4:]).all()  # a masked token has no variance: no correlation
    assert "task[0]: " in obs.compute_bif(lm_run).format_top(2)
    assert "l1 attn" in chi.table() and "code" in chi.table()


def _by_hand(chi, run, member, task="task"):
    """χ of the tokens for which ``member`` [N, K] is true (the task's set left out, masked tokens left out): the
    weighted mean of the per-token χ, computed here from the per-token results."""
    use = member & (run.probes.weights > 0)
    use[run.probes.rows(task)] = False
    return torch.stack([chi.token[g][use].mean() for g in range(len(chi.restrictions))])


def test_token_classes_by_vocabulary_are_the_mean_of_their_tokens(lm_run, tmp_path):
    """Classes by the predicted token (the paper's y) or the context's last token, given as {name: ids},
    {id: name} or ids over the vocabulary, equal the mean of the per-token χ of their tokens (to rounding, 1e-12),
    masked tokens and the task's set left out; per-position ids give the same; the heatmap draws them."""
    vocab, inputs = torch.arange(32), lm_run.probes.inputs
    forms = [({"even": vocab[::2], "odd": vocab[1::2]}, None),
             ({int(t): ("even" if t % 2 == 0 else "odd") for t in vocab}, None), (vocab % 2, ["even", "odd"])]
    for of, looked_up in (("target", inputs[:, 1:]), ("context", inputs[:, :-1])):
        for form, names in forms:
            chi = obs.compute_susceptibilities(lm_run, "task", classes=obs.token_classes(form, names, of=of))
            assert chi.class_names == ["even", "odd"]
            for c in range(2):
                torch.testing.assert_close(chi.classes[:, c], _by_hand(chi, lm_run, looked_up % 2 == c),
                                           rtol=1e-12, atol=1e-15)
            assert (chi.classes_se > 0).all() and sum(chi.class_tokens) == 6 * 15 - 11  # legal[0]: 11 masked
    by_target = obs.compute_susceptibilities(lm_run, "task", classes=forms[0][0])
    per_position = obs.compute_susceptibilities(lm_run, "task", classes=obs.token_classes(inputs[:, 1:] % 2,
                                                                                          ["even", "odd"]))
    torch.testing.assert_close(per_position.classes, by_target.classes, rtol=0, atol=0)
    torch.testing.assert_close(per_position.classes_se, by_target.classes_se, rtol=0, atol=0)
    assert obs.plot_susceptibilities(per_position, tmp_path / "classes.png", by="class").stat().st_size > 1000


def test_token_class_refusals_are_one_line(lm_run):
    cases = [(lambda: obs.compute_susceptibilities(lm_run, "task", classes={"a": [1, 2], "b": [2]}),
              "more than one class"),
             (lambda: obs.compute_susceptibilities(lm_run, "task", classes=torch.zeros(3, 5, dtype=torch.long)),
              r"per-position token classes must be \[10, 15\]"),
             (lambda: obs.token_classes(torch.tensor([0.5])), "integer class ids"),
             (lambda: obs.token_classes(torch.tensor([0, 3]), ["a"]), r"class ids must lie in \[-1, 1\)"),
             (lambda: obs.token_classes({"a": [1]}, of="next"), "of must be one of"),
             (lambda: obs.compute_susceptibilities(lm_run, "task").table(by="class"), "no token classes")]
    for call, message in cases:
        with pytest.raises(FastLLCError, match=message) as caught:
            call()
        assert "\n" not in str(caught.value)


def test_auto_runs_it_on_transformer_with_generics_observables(model, lm_run):
    """``backend="auto"`` picks ``transformer`` (dropout off, GPT-2), whose recorded sums are ``generic``'s. Tolerance:
    every probe loss agrees to conformance's τ relative (tests/test_backend_transformer.py: the same chains, the
    same module function evaluated at them), and every moment is a sum over draws of those non-negative losses or
    of products of two: 2τ relative to max(1, |sum|) (measured: 0.6 eps)."""
    assert {r.backend for r in lm_run.results.values()} == {"transformer"}
    masks = {"legal": torch.ones(3, CONTEXT, dtype=torch.bool)}
    masks["legal"][0, 5:] = False
    generic = obs.observe_lm(model, tokens(24), _probes(), restrictions=RESTRICTIONS, probe_loss_masks=masks,
                             token_moments=True, backend="generic", **SETTINGS)
    assert {r.backend for r in generic.results.values()} == {"generic"}
    for name, value in generic.moments.tensors().items():
        assert conformance.relative_error(getattr(lm_run.moments, name), value) <= 2 * conformance.tolerance(), name


def test_memory_planned_parts_give_the_same_observables(model, lm_run):
    """Chains that do not fit run in parts one after another, keyed by their global index: the same sums."""
    budget = plan(model, 1, SETTINGS["batch_size"], 24, CONTEXT, max_memory=10**10).budget_for(3)
    assert len(plan(model, 6, SETTINGS["batch_size"], 24, CONTEXT, max_memory=budget).groups) == 2
    masks = {"legal": torch.ones(3, CONTEXT, dtype=torch.bool)}
    masks["legal"][0, 5:] = False
    parts = obs.observe_lm(model, tokens(24), _probes(), restrictions=RESTRICTIONS, probe_loss_masks=masks,
                           token_moments=True, max_memory=budget, **SETTINGS)
    for name, value in lm_run.moments.tensors().items():
        torch.testing.assert_close(getattr(parts.moments, name), value, rtol=1e-4, atol=1e-6, msg=name)


def test_lm_refusals_are_one_line(model):
    cases = [({"restrictions": {"x": "l9 attn"}}, "l9"),
             ({"probes": {"a": tokens(2, length=8), "b": tokens(2)}}, "same number of losses"),
             ({"probes": {}}, "non-empty dict"),
             ({"dropout": "yes"}, "dropout must be True or False")]
    for change, message in cases:
        kwargs = {"restrictions": RESTRICTIONS, **change}
        probes = kwargs.pop("probes", _probes())
        with pytest.raises(FastLLCError, match=message) as caught:
            obs.observe_lm(model, tokens(24), probes, **kwargs, **SETTINGS)
        assert "\n" not in str(caught.value)


# --- the devinterp 2.0.1 layer ----------------------------------------------------------------------------

D2 = dict(lr=1e-4, n_beta=30.0, num_chains=2, num_draws=4, batch_size=4, batches_per_draw=1, localization=1000.0,
          num_init_loss_batches=2)


def _observables():
    return {"pile": {"input_ids": tokens(6, seed=1)}, "code-x": {"input_ids": tokens(5, seed=2)}}


def test_devinterp_susceptibilities_are_laid_out_as_devinterps(model):
    from fastllc.compat.devinterp2 import susceptibilities
    tree = susceptibilities(model, {"input_ids": tokens(24)}, _observables(), {"full": None, "l1 attn": "l1 attn",
                            "l0h1": "l0h1"}, sampling_task="pile", **D2)
    sus, context = tree["susceptibilities"].dataset, tree["context"].dataset
    assert sus["sus"].dims == ("sus_flat", "wr") and list(sus["wr"].values) == ["l1 attn", "l0h1"]  # "full" not a row
    assert sus["sus"].dtype == np.float32 and sus.attrs["dataset_id_to_name"] == ["code_x"]
    assert set(sus.coords) == {"dataset_id", "batch", "target_position", "wr"} and sus.sizes["sus_flat"] == 4 * 15
    assert list(sus["target_position"].values[:15]) == list(range(1, 16)) and sus["batch"].values[-1] == 3
    assert context["input_ids"].dims == ("ctx_flat",) and set(context.coords) == {"dataset_id", "batch", "position"}
    chosen = random.Random(1337).sample(range(5), 4)  # devinterp's DeterministicShuffledSampler(obs_seed)
    np.testing.assert_array_equal(context["input_ids"].values, tokens(5, seed=2)[chosen].numpy().ravel())
    assert np.isfinite(sus["sus"].values).all() and (sus["sus_se"].values > 0).all()


@pytest.mark.parametrize("method,reduce,average", [("token", "stack", False), ("token", "mean", True),
                                                   ("sequence", "stack", False), ("sequence", "mean", False)])
def test_devinterp_bif_is_laid_out_as_devinterps(model, method, reduce, average):
    from fastllc.compat.devinterp2 import bif
    out = bif(model, {"input_ids": tokens(24)}, _observables(), correlation_method=method,
              reduce_chain_dimension_method=reduce, average_tokenwise_bif=average, **D2)
    dims = ("batch_1", "batch_2") + (("target_position", "target_position_T") if method == "token" and not average
                                     else ())
    assert out["influences"].dims == dims and out["influences"].dtype == np.float32
    assert out.sizes["batch_1"] == 8 and out["input_ids"].dims == ("batch", "position")
    ids = np.concatenate([tokens(5, seed=2)[random.Random(1337).sample(range(5), 4)],  # sorted ids: code_x, pile
                          tokens(6, seed=1)[random.Random(1337).sample(range(6), 4)]])
    np.testing.assert_array_equal(out["input_ids"].values, ids)
    if method == "sequence":
        np.testing.assert_allclose(np.diag(out["influences"].values), 1.0, rtol=1e-5)


def test_devinterp_layer_refusals_and_output_path(model, tmp_path):
    from fastllc.compat.devinterp2 import bif, susceptibilities
    data, observables = {"input_ids": tokens(24)}, _observables()
    cases = [(lambda: susceptibilities(model, data, observables, {"l1": "l1 attn"}, sampling_task="pile", **D2),
              "must include a 'full' key"),
             (lambda: susceptibilities(model, data, observables, {"full": None}, sampling_task="web", **D2),
              "sampling_task 'web' not found"),
             (lambda: bif(model, data, observables, loss_fn="ce", **D2), "loss_fn must be a function"),
             (lambda: bif(model, data, observables, num_chain=3, **D2), r"bif\(\) got unexpected keyword.*num_chain"),
             (lambda: bif(model, data, observables, noise_level=2.0, **D2), "noise_level=2.0 is not supported"),
             (lambda: bif(model, data, observables, correlation_method="pair", **D2), "correlation_method must be")]
    for call, message in cases:
        with pytest.raises(FastLLCError, match=message):
            call()
    out = bif(model, data, observables, correlation_method="sequence", output_path=tmp_path / "run", **D2)
    draws = obs.open_draws(tmp_path / "run" / "draws.npz")
    assert draws.losses.shape == (2, 4, 8, 15) and out.sizes["batch_1"] == 8
    with pytest.raises(FastLLCError, match="never reuses a stored run"):
        bif(model, data, observables, output_path=tmp_path / "run", **D2)


def test_devinterp_token_bif_streams_to_disk_when_its_sums_would_not_fit(model, monkeypatch):
    """Token influences of many sequences: the per-chain Σ x xᵀ would exceed the memory, so the draws go to a
    temporary .npz (removed afterwards) and the matrix is computed from it in blocks: the same matrix."""
    from fastllc.compat.devinterp2 import observables as devinterp2
    data, observables = {"input_ids": tokens(24)}, _observables()
    in_memory = devinterp2.bif(model, data, observables, correlation_method="token", **D2)
    monkeypatch.setattr(devinterp2, "_token_moments_fit", lambda probes, chains: False)
    created = []
    real = devinterp2.tempfile.TemporaryDirectory
    monkeypatch.setattr(devinterp2.tempfile, "TemporaryDirectory",
                        lambda **kw: created.append(real(**kw)) or created[-1])
    blocked = devinterp2.bif(model, data, observables, correlation_method="token", bif_batch_size=3, **D2)
    np.testing.assert_allclose(blocked["influences"].values, in_memory["influences"].values, rtol=1e-4, atol=1e-5)
    assert not Path(created[0].name).exists()  # the scratch folder is gone


def cross_entropy(model, input_ids):
    """devinterp's default per-token loss written as a loss_fn: (model, input_ids) → [B, T − 1]."""
    logits = model(input_ids).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")


def second_half(model, input_ids):
    """A custom loss_fn: the next-token cross-entropy of the second half of each sequence only."""
    ce = cross_entropy(model, input_ids)
    return ce * (torch.arange(ce.shape[1]) >= ce.shape[1] // 2)


def test_a_custom_loss_fn_is_what_the_chains_follow_and_the_observables_record(model):
    """devinterp's loss_fn (devinterp/slt/observables.py ``Observable.compute_loss``, sampling.py
    ``_write_init_loss``): the chains' loss is the mean of its entries, each observable records its entries,
    L̂_n(w*) is their mean over the first num_init_loss_batches minibatches. At lr = 1e-12 the chains stay at w*
    (noise √lr = 1e-6 per weight moves a loss by ~1e-6 relative), so everything equals loss_fn at w*: rtol 1e-4."""
    from fastllc.compat.devinterp2 import devinterp_order, observe
    data, observables = tokens(24), _observables()
    run = observe(model, {"input_ids": data}, observables, {"full": None}, loss_fn=second_half,
                  **dict(D2, lr=1e-12))
    epoch = devinterp_order(24, 4, seed=100, shuffle=True)
    with torch.no_grad():
        expected = [second_half(model, data[epoch[b]]).mean().item() for b in range(4)]
        probes = second_half(model, run.probes.inputs).double()  # [8, 15]: the observables' sequences
    assert run.init_loss == pytest.approx(np.mean(expected[:2]), rel=1e-5)  # 2 init batches
    np.testing.assert_allclose(run.results["full"].loss_trace[:, :4].numpy(), [expected] * 2, rtol=1e-4)
    mean = run.moments.x / run.moments.count[:, None, None]  # [chain, N, K]: each chain's mean over its draws
    np.testing.assert_allclose(mean.numpy(), probes.expand(2, -1, -1).numpy(), rtol=1e-4, atol=1e-7)
    assert (run.moments.x[:, :, :7] == 0).all()  # the first half: loss_fn gives 0, recorded as 0
    assert {r.backend for r in run.results.values()} == {"generic"}


def test_a_loss_fn_that_is_the_cross_entropy_gives_the_default_results(model):
    """bif() and susceptibilities() with loss_fn = devinterp's own per-token cross-entropy give what they give
    without it: the same chains (same minibatches, same noise streams), on generic instead of transformer, whose
    losses agree to conformance's τ ≈ 2e-6 relative. χ and the correlations are covariances of ~3.5-nat losses
    computed as E[ab] − E[a]E[b], which cancels ~10³-fold here (|χ| ~ 1e-3 against products ~12), so the tolerances
    are 1e-3 of the largest |χ| and 1e-4 on correlations (measured: 6e-6 of it, and 2e-6)."""
    from fastllc.compat.devinterp2 import bif, susceptibilities
    data, observables, wr = {"input_ids": tokens(24)}, _observables(), {"full": None, "l1 attn": "l1 attn"}
    default, custom = (susceptibilities(model, data, observables, wr, sampling_task="pile", loss_fn=f,
                                        **D2)["susceptibilities"].dataset["sus"].values for f in (None, cross_entropy))
    assert np.abs(custom - default).max() <= 1e-3 * np.abs(default).max()
    influences = [bif(model, data, observables, correlation_method="sequence", loss_fn=f, **D2)["influences"].values
                  for f in (None, cross_entropy)]
    np.testing.assert_allclose(influences[1], influences[0], rtol=0, atol=1e-4)
