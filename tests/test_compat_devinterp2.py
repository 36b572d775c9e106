"""fastllc.compat.devinterp2 without devinterp 2.0.1 (tests/compat2 compares with it in its own environment):
devinterp's minibatch order and L̂_n(w*), λ̂ over every step, the Dataset's fields and dtypes, masks, the cache at
output_path, what fastllc.lm.estimate gained for it (dropout, mask dicts), and one-line refusals."""

import ast
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import fastllc.lm as lm
from fastllc.compat.devinterp2 import bif, create_param_masks, devinterp_order, llc, susceptibilities
from fastllc.compat.devinterp2.settings import sample_settings
from fastllc.errors import FastLLCError

from lm_models import gpt2, hooked, neox, tokens

pytest.importorskip("xarray")
FAST = dict(lr=1e-4, n_beta=20.0, num_chains=3, num_draws=6, num_burnin_steps=2, batch_size=4,
            num_init_loss_batches=3)


def still():
    """A GPT-2 without dropout: devinterp evaluates in training mode, so only then is the loss a function of w."""
    return gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def loss_on(model, rows):
    with lm.sampling_mode(model):
        return lm.loss_at(lm.CausalLM(model), lm.token_data(rows))


def test_the_order_is_that_of_devinterps_seeded_loader():
    order = devinterp_order(10, 4, seed=100, shuffle=True)
    loader = DataLoader(list(range(10)), batch_size=4, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(100))
    assert torch.equal(order, torch.stack(list(loader))) and order.shape == (2, 4)
    assert torch.equal(devinterp_order(9, 3, seed=5, shuffle=False), torch.arange(9).reshape(3, 3))


def test_chains_see_devinterps_minibatches_and_its_loss_at_w_star():
    model, toks = still(), tokens(12)  # 12 sequences, batches of 4: an epoch of 3 minibatches, cycled
    out = llc(model, toks, None, **dict(FAST, lr=1e-12, num_init_loss_batches=4))
    epoch = devinterp_order(12, 4, seed=100, shuffle=True)
    first = epoch[[0, 1, 2, 0]].reshape(-1)  # 4 init batches from an epoch of 3: the cycle replays batch 0
    assert float(out.init_loss) == pytest.approx(loss_on(model, toks[first]), rel=1e-6)
    for step in range(4):  # lr ~ 0: each step's loss is the loss at w* on that step's minibatch, every chain
        expected = loss_on(model, toks[epoch[step % 3]])
        np.testing.assert_allclose(out.loss_trace.values[:, step], expected, rtol=1e-5)


def test_without_matching_each_chain_has_its_own_order_and_loss_at_w_star():
    model, toks = still(), tokens(16)
    out = llc(model, toks, {}, **dict(FAST, lr=1e-12, match_sampling_input_ids_across_chains=False,
                                      gradient_accumulation_steps=2, batch_size=2))
    inits = []
    for chain in range(3):
        epoch = devinterp_order(16, 2, seed=100 + chain, shuffle=True)
        inits.append(loss_on(model, toks[epoch[:6].reshape(-1)]))  # 3 batches × 2 accumulated
        np.testing.assert_allclose(out.loss_trace.values[chain, 0], loss_on(model, toks[epoch[:2].reshape(-1)]),
                                   rtol=1e-5)
    assert float(out.init_loss) == pytest.approx(np.mean(inits), rel=1e-6)


def test_the_dataset_is_devinterps_with_every_step_averaged():
    model = gpt2()
    out = llc(model, tokens(16), {"train": tokens(16)}, **FAST)
    assert out.sizes == {"chain": 3, "step": 2 + 6} and not out.coords
    for name in ("llc_mean", "llc_std", "llc_per_chain", "loss_trace"):
        assert out[name].dtype == np.float32, name
    for name in ("llc_scalar", "init_loss"):
        assert out[name].dtype == np.float64, name
    trace = out.loss_trace.values.astype(np.float64)
    per_chain = 20.0 * (trace.mean(axis=1) - float(out.init_loss))  # burn-in steps included, as devinterp
    np.testing.assert_allclose(out.llc_per_chain.values, per_chain, rtol=1e-4, atol=1e-5)
    assert float(out.llc_std) == pytest.approx(np.std(per_chain), rel=1e-4, abs=1e-6)  # ddof 0 (xarray's std)
    assert float(out.llc_scalar) == pytest.approx(20.0 * (trace.mean() - float(out.init_loss)), rel=1e-6, abs=1e-9)
    assert out.healthy.values.all() and math.isfinite(float(out.llc_se)) and "llc_mean" in out.attrs["fastllc"]


def test_rmsprop_settings_reach_fastllc():
    out = llc(gpt2(), tokens(16), None, **dict(FAST, lr=1e-6, sampling_method="rmsprop_sgld", rmsprop_alpha=0.9,
                                              sampling_method_kwargs={"eps": 0.2}))
    assert '"sampler": "rmsprop_sgld"' in out.attrs["fastllc"]
    settings = sample_settings(1e-6, 20.0, None, None, dict(sampling_method="rmsprop_sgld", rmsprop_alpha=0.9,
                                                            sampling_method_kwargs={"eps": 0.2}))
    assert (settings["rmsprop_alpha"], settings["rmsprop_eps"]) == (0.9, 0.2)


def test_masks_are_devinterps_and_restrict_the_chains():
    model = gpt2()
    for head in ("l0h0", "l1h3"):
        ours = {k: v for k, v in create_param_masks(model, head).items()}
        assert {k: torch.equal(v, lm.name_mask(model, head)[k]) for k, v in ours.items()} == \
            {k: True for k in lm.name_mask(model, head)}  # GPT-2 heads: the same elements as fastllc.lm's names
    assert list(create_param_masks(model, "embed")) == ["transformer.wte.weight"]  # devinterp's: no wpe
    assert create_param_masks(model, "unembed") == {}  # lm_head.weight is tied: named_parameters() omits it
    assert all(v is None for v in create_param_masks(model, "full").values())
    merged = create_param_masks(neox(), ["l0h1", "l0 attn"])
    assert all(v is None for v in merged.values()) and len(merged) == 4
    with pytest.raises(FastLLCError, match="selects no weight"):
        llc(model, tokens(16), None, param_masks=create_param_masks(model, "unembed"), **FAST)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = llc(model, tokens(16), None, param_masks=create_param_masks(model, "l0h1"), **FAST)
    assert '"sampled_weights": 1048' in out.attrs["fastllc"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and model.training


# ---- TransformerLens HookedTransformer: devinterp's "hooked_transformer" entry -----------------------------

HOOKED = {"mha": lambda: hooked(), "gqa": lambda: hooked(n_key_value_heads=2),  # _W_K/_W_V [2, ...]
          "three-heads": lambda: hooked(heads=3, width=24)}
HOOKED_NAMES = ["full", "embed", "unembed", "l0", "l1", "l0 attn", "l1 mlp", "L1 H2", "l0g1", "blocks.1.ln2.w",
                ["l0h1", "l1 mlp", "embed"]]


def hooked_entries(model, restriction) -> dict:
    """What devinterp 2.0.1 selects on a HookedTransformer, written out from its HEAD_STRUCTURES entry:
    {parameter name: None (all of it) or bool tensor of its shape}. A head h is index h of dim 0 of W_Q, W_O,
    b_Q and of K/V (``_W_K``... at h // (heads / kv-heads) under grouped-query attention); a group g is the g-th
    block of heads / kv-heads query heads and kv head g; embed is W_E only, unembed W_U and b_U (no W_pos, no
    ln_final). A list is the union, in first-seen order, None where any part is None."""
    params = dict(model.named_parameters())
    if isinstance(restriction, list):
        parts = [hooked_entries(model, r) for r in restriction]
        names = dict.fromkeys(n for part in parts for n in part)
        return {n: None if any(p.get(n, 0) is None for p in parts) else
                torch.stack([p[n] for p in parts if n in p]).any(dim=0) for n in names}
    r = restriction.lower().replace(" h", "h")
    if r == "full" or r in params:
        return {n: None for n in params if r in ("full", n)}
    if r in ("embed", "unembed"):
        return dict.fromkeys(["embed.W_E"] if r == "embed" else ["unembed.W_U", "unembed.b_U"])
    layer, rest = r[1], r[2:]
    if rest in ("", " attn", " mlp"):
        return {n: None for n in params if n.startswith(f"blocks.{layer}.{rest.strip()}")}
    heads, kv = model.cfg.n_heads, model.cfg.n_key_value_heads or model.cfg.n_heads
    index = int(rest[1:])
    query = [index] if rest[0] == "h" else list(range(index * heads // kv, (index + 1) * heads // kv))
    key_value = [index * kv // heads] if rest[0] == "h" else [index]
    out = {}
    for name in params:
        short = name.removeprefix(f"blocks.{layer}.attn.")
        if short in ("W_Q", "W_O", "b_Q") or short.lstrip("_") in ("W_K", "W_V", "b_K", "b_V"):
            out[name] = torch.zeros(params[name].shape, dtype=torch.bool)
            out[name][query if short in ("W_Q", "W_O", "b_Q") or kv == heads else key_value] = True
    return out


@pytest.mark.parametrize("build", HOOKED.values(), ids=HOOKED.keys())
def test_hooked_transformer_masks_select_devinterps_entries(build):
    model = build()
    params = dict(model.named_parameters())
    for restriction in HOOKED_NAMES + [f"l{layer}h{h}" for layer in range(2) for h in range(model.cfg.n_heads)]:
        masks, expected = create_param_masks(model, restriction), hooked_entries(model, restriction)
        assert list(masks) == list(expected), restriction
        for name, mask in masks.items():
            assert (mask is None) == (expected[name] is None), (restriction, name)
            if mask is not None:
                assert mask.shape == params[name].shape and torch.equal(mask, expected[name]), (restriction, name)


def test_hooked_transformer_head_masks_read_its_cfg():
    model = hooked(n_key_value_heads=2)
    assert "blocks.0.attn._W_K" in create_param_masks(model, "l0h3")  # the grouped-query variant was chosen
    assert int(create_param_masks(model, "l0h3")["blocks.0.attn._W_K"].sum()) == 32 * 8  # kv head 1 of 2
    with pytest.raises(FastLLCError, match="head 4 out of range"):
        create_param_masks(model, "l0h4")
    with pytest.raises(FastLLCError, match="group 2 out of range"):
        create_param_masks(model, "l0g2")


def test_llc_on_a_hooked_transformer_is_cross_entropy_of_its_logits():
    """devinterp runs a HookedTransformer as ``model(input_ids)`` (logits) and takes the next-token cross-entropy."""
    model, toks = hooked(), tokens(16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = llc(model, toks, None, param_masks=create_param_masks(model, "l0h1"), **dict(FAST, lr=1e-12))
    assert '"sampled_weights": 1048' in out.attrs["fastllc"]  # 4·32·8 weights + 3·8 biases of one head
    epoch = devinterp_order(16, 4, seed=100, shuffle=True)
    with torch.no_grad():
        expected = [torch.nn.functional.cross_entropy(model(toks[b])[:, :-1].transpose(1, 2), toks[b][:, 1:]).item()
                    for b in epoch[[0, 1, 2, 3]]]
    assert float(out.init_loss) == pytest.approx(np.mean(expected[:3]), rel=1e-5)
    np.testing.assert_allclose(out.loss_trace.values[:, :4], np.tile(expected, (3, 1)), rtol=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    moving = llc(model, toks, None, **FAST)  # every weight
    assert out.healthy.values.all() and moving.healthy.values.all() and math.isfinite(float(moving.llc_mean))


def test_susceptibilities_and_bif_take_devinterp_names_on_a_hooked_transformer():
    model, probes = hooked(), {"train": tokens(12, seed=1), "other": tokens(12, seed=2)}
    settings = dict(FAST, num_chains=2, num_draws=4, num_init_loss_batches=2)
    tree = susceptibilities(model, tokens(16), probes, {"full": None, "l0h1": "l0h1", "l1g0": "l1g0"},
                            sampling_task="train", **settings)
    sus = tree["susceptibilities"].sus
    assert list(sus.wr.values) == ["l0h1", "l1g0"] and np.isfinite(sus.values).all()
    sampled = {name: r["sampled_weights"] for name, r in json.loads(tree["susceptibilities"].attrs["fastllc"]).items()}
    expected = {name: hooked_count(model, name) for name in ("full", "l0h1", "l1g0")}
    assert sampled == expected and expected["l0h1"] == expected["l1g0"] == 1048  # MHA: group 0 is head 0
    out = bif(model, tokens(16), {"train": probes["train"]}, param_masks=create_param_masks(model, "l0 attn"),
              **settings)
    assert out.influences.shape == (12, 12, 15, 15) and np.isfinite(out.influences.values).all()
    assert json.loads(out.attrs["fastllc"])["sampled_weights"] == hooked_count(model, "l0 attn")


def hooked_count(model, restriction) -> int:
    """The weights devinterp's entry selects (``hooked_entries``), counted."""
    params = dict(model.named_parameters())
    return sum(params[n].numel() if mask is None else int(mask.sum())
               for n, mask in hooked_entries(model, restriction).items())


def test_chain_averaged_bif_keeps_the_draws_on_disk_when_they_would_not_fit(monkeypatch, tmp_path):
    """reduce_chain_dimension_method="mean" keeps every chain's draws; when they would not fit the budget they go
    to a scratch file (or output_path's) instead and the same matrix comes from it (float32 draws both ways, the
    sums' float64 arithmetic against the blocked one: rtol 1e-6). When even the sums without them would not fit,
    the refusal names what a devinterp caller can change."""
    from fastllc.compat.devinterp2 import observables as devinterp2
    model, probes = still(), {"train": tokens(12, seed=1)}
    settings = dict(FAST, reduce_chain_dimension_method="mean", correlation_method="sequence")
    in_memory = bif(model, tokens(16), probes, **settings)
    monkeypatch.setattr(devinterp2, "_chain_mean_fit", lambda needed, budget: False)
    kept, real = [], devinterp2.bif_from_run
    monkeypatch.setattr(devinterp2, "bif_from_run", lambda run, **kw: kept.append(
        (run.moments.chain_draws, run.raw)) or real(run, **kw))
    on_disk = bif(model, tokens(16), probes, **settings)
    np.testing.assert_allclose(on_disk.influences.values, in_memory.influences.values, rtol=1e-6, atol=1e-7)
    cached = bif(model, tokens(16), probes, output_path=str(tmp_path / "run"), **settings)
    np.testing.assert_allclose(cached.influences.values, in_memory.influences.values, rtol=1e-6, atol=1e-7)
    assert kept[0][0] is None and kept[0][1].name == "draws.npz" and not kept[0][1].exists()  # scratch, removed
    assert kept[1][0] is None and kept[1][1] == tmp_path / "run" / "draws.npz" and kept[1][1].exists()
    monkeypatch.setattr("fastllc.observables.recording.sums_budget", lambda max_memory: (1000, "max_memory"))
    with pytest.raises(FastLLCError, match=r"^bif: the observables' running sums need .* use fewer num_chains"):
        bif(model, tokens(16), probes, **settings)


def test_output_path_caches_the_result_and_refuses_other_settings(tmp_path, monkeypatch):
    path = tmp_path / "samples.zarr"
    first = llc(gpt2(), tokens(16), None, output_path=str(path), **FAST)
    monkeypatch.setattr(lm, "estimate", lambda *a, **k: pytest.fail("the cached result should be returned"))
    again = llc(gpt2(), tokens(16), None, output_path=str(path), **FAST)
    for name, variable in first.data_vars.items():
        assert again[name].dtype == variable.dtype and np.array_equal(again[name].values, variable.values), name
    with pytest.raises(FastLLCError, match=r"other settings \(lr\)"):
        llc(gpt2(), tokens(16), None, output_path=str(path), **dict(FAST, lr=2e-4))
    (tmp_path / "theirs.zarr").mkdir()
    with pytest.raises(FastLLCError, match="holds no readable fastllc result"):
        llc(gpt2(), tokens(16), None, output_path=str(tmp_path / "theirs.zarr"), **FAST)


def test_a_custom_per_token_loss_is_the_chain_loss():
    model, toks = still(), tokens(16)

    def second_half(model, ids):  # devinterp's loss_fn: (model, input_ids) → per-token loss [B, T − 1]
        ce = torch.nn.functional.cross_entropy(model(ids).logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        return ce * (torch.arange(ce.shape[1]) >= ce.shape[1] // 2)

    out = llc(model, toks, None, loss_fn=second_half, **dict(FAST, lr=1e-12))
    epoch = devinterp_order(16, 4, seed=100, shuffle=True)
    with torch.no_grad():
        expected = [second_half(model, toks[epoch[b]]).mean().item() for b in range(4)]
    assert float(out.init_loss) == pytest.approx(np.mean(expected[:3]), rel=1e-5)  # 3 init batches
    np.testing.assert_allclose(out.loss_trace.values[0, :4], expected, rtol=1e-5)


def test_fastllc_lm_estimate_in_training_mode_and_with_a_mask_dict():
    model, toks = gpt2(), tokens(16)  # GPT-2's default dropout 0.1
    settings = dict(chains=2, steps=6, batch_size=4, epsilon=1e-4, gamma=1000.0, nbeta=20.0)
    torch.manual_seed(1)
    on = lm.estimate(model, toks, dropout=True, **settings)
    torch.manual_seed(1)
    again = lm.estimate(model, toks, dropout=True, **settings)
    off = lm.estimate(model, toks, **settings)
    assert torch.equal(on.loss_trace, again.loss_trace) and on.init_loss > off.init_loss  # dropout raises the loss
    assert model.training
    masks = {k: v.clone() for k, v in lm.name_mask(model, "l0h1").items()}
    assert lm.estimate(model, toks, restrict=masks, **settings).sampled_weights == 1048


@pytest.mark.parametrize("settings, message", [
    (dict(loss_fn=lambda m, x: x), r"must have shape \(12, 15\) for these 12 sequences, got \(12, 16\)"),
    (dict(loss_fn="ce"), "loss_fn must be a function"),
    (dict(noise_level=0.5), "noise_level=0.5 is not supported"),
    (dict(llc_weight_decay=0.1), "llc_weight_decay"),
    (dict(bounding_box_size=1.0), "bounding_box_size"),
    (dict(init_noise=0.01), "init_noise"),
    (dict(sampling_method="sgnht"), "sampling_method must be"),
    (dict(rmsprop_eps=0.1), "only be set when sampling_method='rmsprop_sgld'"),
    (dict(sampling_method="rmsprop_sgld", rmsprop_eps=0.1, sampling_method_kwargs={"eps": 0.1}), "both"),
    (dict(sampling_method_kwargs={"sketch_dim": 8}), "sketch_dim not supported"),
    (dict(num_chian=4), "unexpected keyword argument"),
    (dict(num_chains=0), "num_chains must be at least 1"),
    (dict(lr=0.0), "lr must be greater than 0"),
    (dict(batch_size=32), "fewer than batch_size=32"),
    (dict(param_masks={"transformer.wte.weigth": None}), "closest: 'transformer.wte.weight'"),
    (dict(param_masks={"transformer.wte.weight": torch.ones(2, 2)}), "has shape"),
    (dict(param_masks=["l0h1"]), "param_masks must be a dict"),
])
def test_unsupported_arguments_are_refused_in_one_line(settings, message):
    kwargs = {**FAST, **settings}
    with pytest.raises(FastLLCError, match=message) as error:
        llc(gpt2(), tokens(16), None, **kwargs)
    assert "\n" not in str(error.value)


def test_create_param_masks_refusals():
    for restriction, message in [("l5h0", "layer 5 out of range"), ("l0h9", "head 9 out of range"),
                                 ("l0g7", "group 7 out of range"), ("heads", "unknown restriction"),
                                 (["full", "l0"], "cannot combine 'full'"), (3, "str or list")]:
        with pytest.raises(FastLLCError, match=message):
            create_param_masks(gpt2(), restriction)
    bert = torch.nn.Linear(2, 2)
    bert.config = type("Config", (), {"model_type": "bert"})()
    with pytest.raises(FastLLCError, match="model type 'bert'"):
        create_param_masks(bert, "l0h0")


def _private_names(tree) -> set:
    """A module's top-level private functions, classes and assignments."""
    names = set()
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node]
        names |= {getattr(t, "name", getattr(t, "id", "")) for t in targets}
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def test_no_devinterp2_module_uses_anothers_private_names():
    """The layer's modules share devinterp's settings, order and L̂_n(w*) through settings.py's public names: no
    module imports, or reaches through an attribute for, a private top-level name of another (a ``_compat()``
    indirection included). Checked on the source itself, so a new private import fails here."""
    import fastllc.compat.devinterp2 as package
    trees = {path.stem: ast.parse(path.read_text()) for path in Path(package.__file__).parent.glob("*.py")}
    private = {stem: _private_names(tree) for stem, tree in trees.items()}
    assert "_refuse_off_defaults" in private["settings"]  # the check sees the private names
    for stem, tree in trees.items():
        others = set().union(*(names for other, names in private.items() if other != stem)) - private[stem]
        used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        used |= {a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for a in node.names}
        assert not used & others, (stem, sorted(used & others))
