"""Per-chain restriction masks [C, d] and ``estimate_groups`` (several weight groups' λ̂ in one batched run)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

import fastllc.api
from fastllc import FastLLCError, ModularMLP, SGLDConfig, estimate
from fastllc.api import estimate_groups
from fastllc.backends import generic, names, reference, with_capabilities
from fastllc.sampling.chains import HeldWeights
from fastllc.cli.estimate import estimate_command
from fastllc.sampling.contract import flat_parameters
from fastllc.sampling.restrict import check_mask, group_masks, selection_mask

from test_cli import assert_one_line_error
from test_restrict import BACKENDS, data, tiny_model  # the same tiny model and data


def rows(model):
    """Three chains, three different restrictions: the first layer, the second, and an element-wise mix."""
    mix = {"0.weight": torch.arange(15).reshape(5, 3) % 2 == 0, "2.bias": torch.ones(2, dtype=torch.bool)}
    return torch.stack([selection_mask(model, s) for s in ("0.*", "2.*", mix)])


def sample(backend, model, config, restrict):
    x, y = data()
    keywords = {"trace": True} if backend == "generic" else {}  # generic's traced replay, as long runs use
    return BACKENDS[backend].sample(model, x, y, F.cross_entropy, config, restrict=restrict, **keywords)


@pytest.mark.parametrize("backend", ["reference", "generic"])
@pytest.mark.parametrize("sampler,orthogonal", [("sgld", False), ("sgld", True), ("rmsprop_sgld", False)])
def test_a_per_chain_mask_run_equals_separate_runs_with_each_row(backend, sampler, orthogonal):
    """Chain c of a [C, d] run is chain c of a [d] run with row c, bit for bit: chain c's randomness is keyed by
    c in both (C the same), and nothing of a chain's step depends on the other chains' rows."""
    model = tiny_model()
    w_star, keep = flat_parameters(model)[2], rows(model)
    config = SGLDConfig(chains=3, steps=30, batch_size=8, epsilon=[1e-2, 3e-3, 1e-3], gamma=[3.0, 1.0, 0.0],
                        nbeta=5.0, orthogonal=orthogonal, sampler=sampler)
    together = sample(backend, model, config, keep)
    for c in range(3):
        alone = sample(backend, model, config, keep[c])
        assert torch.equal(together.loss_trace[c], alone.loss_trace[c])
        assert torch.equal(together.final_params[c], alone.final_params[c])
        frozen = together.final_params[c, ~keep[c]]
        assert torch.equal(frozen, w_star[~keep[c]])  # this chain's unselected weights: exactly w*
        assert (together.final_params[c, keep[c]] != w_star[keep[c]]).all()  # its selected ones all moved
    assert torch.isfinite(together.loss_trace).all()


def test_reference_and_generic_follow_the_same_per_chain_restricted_trajectories():
    from fastllc.sampling import InjectedRandomness
    model, (x, y) = tiny_model(), data()
    noise = InjectedRandomness.seeded(3, 40, len(y), 8, flat_parameters(model)[2].numel(), seed=3)
    config = SGLDConfig(chains=3, steps=40, batch_size=8, epsilon=[1e-2, 3e-3, 1e-3], gamma=[3.0, 1.0, 0.0],
                        nbeta=[5.0, 10.0, 20.0], orthogonal=True)
    ref = reference.sample(model, x, y, F.cross_entropy, config, randomness=noise, restrict=rows(model))
    fast = generic.sample(model, x, y, F.cross_entropy, config, randomness=noise, restrict=rows(model), trace=True)
    # as tests/test_restrict.py: the same fp32 formulas batched, only the summation order differs (~1e-7 relative
    # per step); 1e-5 as there, while a wrong row (another chain's mask or direction) moves weights by > 1e-3
    torch.testing.assert_close(fast.final_params, ref.final_params, rtol=0, atol=1e-5)
    torch.testing.assert_close(fast.loss_trace, ref.loss_trace, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "generic"])
def test_check_mask_refuses_a_wrong_shape_or_an_empty_row(backend):
    model = tiny_model()
    config = SGLDConfig(chains=3, steps=2, batch_size=8)
    wrong = torch.ones(2, 32, dtype=torch.bool)
    with pytest.raises(FastLLCError, match=r"^restrict must reach the backend as a bool tensor of shape \(32,\) or "
                                           r"\(3, 32\) over the flat weights, got \(2, 32\)"):
        sample(backend, model, config, wrong)
    empty = rows(model)
    empty[1] = False
    with pytest.raises(FastLLCError, match=r"^restrict selects no weights for chain 1; select at least one weight"):
        sample(backend, model, config, empty)
    assert torch.equal(check_mask(rows(model), 32, 3), rows(model))


def test_each_group_equals_estimate_restricted_to_it_on_the_same_chain_ids():
    """Group g's chain j is chain g·chains + j of the batch: the same trajectory as that chain of
    ``estimate(restrict=group, chains=groups × chains)``, so the same λ̂ per chain, exactly."""
    model, xy = tiny_model(), data()
    settings = dict(chains=2, steps=40, batch_size=8, epsilon=3e-3, orthogonal=True, backend="generic")
    groups = {"first": "0.*", "second": [model[2]], "mixed": ["0.bias", {"2.weight": torch.eye(2, 5) > 0}]}
    results = estimate_groups(model, xy, groups=groups, **settings)
    assert list(results) == ["first", "second", "mixed"]
    for g, (name, selection) in enumerate(groups.items()):
        alone = estimate(model, xy, restrict=selection, **dict(settings, chains=6))
        own = slice(2 * g, 2 * g + 2)
        assert results[name].llc_per_chain == alone.llc_per_chain[own]
        assert torch.equal(results[name].loss_trace, alone.loss_trace[own])
        assert results[name].sampled_weights == alone.sampled_weights
        assert results[name].chains == 2 and results[name].nbeta == pytest.approx(40 / math.log(40))  # n/log n


def test_per_module_and_per_parameter_groups_and_overlapping_groups():
    model, xy = tiny_model(), data()
    per_module = estimate_groups(model, xy, groups="per-module", chains=2, steps=20, batch_size=8)
    assert {name: r.sampled_weights for name, r in per_module.items()} == {"0": 20, "2": 12}
    per_parameter = estimate_groups(model, xy, groups="per-parameter", chains=2, steps=20, batch_size=8)
    assert {name: r.sampled_weights for name, r in per_parameter.items()} == {"0.weight": 15, "0.bias": 5,
                                                                              "2.weight": 10, "2.bias": 2}
    overlapping = estimate_groups(model, xy, groups={"all": "*", "last": "2.*"}, chains=2, steps=20, batch_size=8)
    assert [r.sampled_weights for r in overlapping.values()] == [32, 12]  # allowed: each group's own chains
    assert all(r.healthy_chains == 2 for r in [*per_module.values(), *overlapping.values()])
    record = json.loads(per_parameter.to_json())
    assert list(record) == list(per_parameter) and record["2.bias"]["sampled_weights"] == 2
    table = per_parameter.table().splitlines()
    assert table[0].split() == ["group", "weights", "λ̂", "±", "se", "healthy"] and len(table) == 5
    assert table[4].split()[:2] == ["2.bias", "2"] and table[4].endswith("2/2")


def test_per_module_groups_of_a_model_with_tied_weights_share_the_tied_tensor():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)
            self.b.weight = self.a.weight  # named once by named_parameters(): 'a.weight'

    masks = group_masks(Tied(), "per-module")
    assert list(masks) == ["a", "b"] and [int(m.sum()) for m in masks.values()] == [12, 12]  # d = 9 + 3 + 3
    assert torch.equal(masks["a"] & masks["b"], torch.arange(15) < 9)  # both hold the tied weight


def test_per_chain_settings_apply_to_every_group_and_init_loss_to_all():
    model, xy = tiny_model(), data()
    results = estimate_groups(model, xy, groups={"a": "0.*", "b": "2.*"}, chains=2, steps=20, batch_size=8,
                              epsilon=[1e-3, 3e-3], nbeta=[4.0, 8.0], init_loss=0.5, backend="reference")
    for result in results.values():
        assert result.epsilon == [1e-3, 3e-3] and result.nbeta == [4.0, 8.0] and result.init_loss == 0.5


def test_a_groups_unhealthy_chains_are_reported_under_its_name():
    model, xy = tiny_model(), data()
    with pytest.warns(RuntimeWarning, match=r"^group 'last': 2 of 2 chains diverged or left the basin"):
        results = estimate_groups(model, xy, groups={"last": "2.*"}, chains=2, steps=20, batch_size=8, epsilon=1e4)
    assert results["last"].healthy_chains == 0 and math.isnan(results["last"].llc_mean)
    assert results.table().splitlines()[1].split()[2:] == ["—", "0/2"]


def test_the_registry_picks_a_backend_that_restricts_for_the_studys_mlp():
    torch.manual_seed(0)
    model = ModularMLP(5, 3, 6)
    pairs = torch.cartesian_prod(torch.arange(5), torch.arange(5))
    results = estimate_groups(model, (pairs, pairs.sum(1) % 5), groups="per-parameter", chains=2, steps=10,
                              batch_size=8)
    assert list(results) == ["embed.weight", "left.weight", "left.bias", "right.weight", "right.bias",
                             "unembed.weight"]
    backend = results["embed.weight"].backend
    assert backend in with_capabilities(("restrict",)) and all(r.backend == backend for r in results.values())
    lacking = [name for name in names() if name not in with_capabilities(("restrict",))]
    if lacking:  # a backend without the capability is refused by name, before any work
        with pytest.raises(FastLLCError, match=rf"^restrict= \(weight-restricted sampling\) needs backend .*, not "
                                               rf"'{lacking[0]}'$"):
            estimate_groups(model, (pairs, pairs.sum(1) % 5), chains=2, steps=10, batch_size=8,
                            backend=lacking[0])


BAD_GROUPS = [
    ({"embed": "1.weight"}, r"^groups\['embed'\]: '1\.weight' matches no trainable parameter of the model; closest: "
                       r"'2\.weight', '0\.weight' \(see model\.named_parameters\(\)\)$"),
    ({"ok": "0.*", "typo": "2.wieght"}, r"^groups\['typo'\]: '2\.wieght' matches no trainable parameter of the "
                                        r"model; closest: '2\.weight'"),
    ({"a": {"0.weight": torch.ones(3, 5, dtype=torch.bool)}},
     r"^groups\['a'\]: the mask for '0\.weight' has shape \(3, 5\), the parameter \(5, 3\); give a boolean mask of "
     r"the parameter's shape$"),
    ({"a": torch.ones(33, dtype=torch.bool)}, r"^groups\['a'\]: a flat mask has shape \(33,\), the model has 32 "
                                              r"trainable weights; give a bool tensor of shape \(32,\)"),
    ({"a": "0.*", "b": []}, r"^groups\['b'\] selects no weights \(an empty list, or every mask is False\); select "
                            r"at least one weight, or drop the group$"),
    ({"a": {"2.bias": torch.zeros(2, dtype=torch.bool)}}, r"^groups\['a'\] selects no weights"),
    ({}, r"^groups is empty \(or the model has no trainable parameters\); give at least one \{name: selection\}$"),
    ({1: "0.*", "1": "2.*"}, r"^groups has names that read the same as text: 1, '1'; give every group a distinct "
                             r"name$"),
    ("per-layer", r"^groups must be a dict \{name: selection\}, 'per-module' or 'per-parameter', not 'per-layer'$"),
    (["0.*", "2.*"], r"^groups must be a dict \{name: selection\}, 'per-module' or 'per-parameter', not list$"),
]


@pytest.mark.parametrize("groups,message", BAD_GROUPS, ids=[f"bad{i}" for i in range(len(BAD_GROUPS))])
def test_bad_groups_are_one_line_errors_before_any_sampling(groups, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fastllc.api, "sample", lambda *a, **k: pytest.fail("sampled despite bad groups"))
    model, xy = tiny_model(), data()
    before = flat_parameters(model)[2]
    with pytest.raises(FastLLCError, match=message) as error:
        estimate_groups(model, xy, groups=groups, chains=2, steps=5)
    assert "\n" not in str(error.value)
    assert torch.equal(flat_parameters(model)[2], before) and sorted(tmp_path.iterdir()) == []


def test_cli_per_parameter_table_and_json(tiny_run):
    runner = CliRunner()
    args = ["--run", str(tiny_run.path), "--chains", "2", "--steps", "20", "--batch-size", "8", "--per-parameter"]
    shown = runner.invoke(estimate_command, args)
    assert shown.exit_code == 0, shown.output
    lines = shown.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("group"))
    table = [line.split() for line in lines[header + 1 : header + 7]]
    tensors = ["embed.weight", "left.weight", "left.bias", "right.weight", "right.bias", "unembed.weight"]
    assert [row[0] for row in table] == tensors
    assert [int(row[1]) for row in table] == [5 * 4, 16 * 4, 16, 16 * 4, 16, 5 * 16]  # p=5, embed 4, hidden 16
    assert all(row[-1] == "2/2" for row in table)
    assert "6 groups × 2 chains = 12 chains × 20 steps in one batch" in shown.stdout
    record = json.loads(runner.invoke(estimate_command, args + ["--json"]).stdout)
    assert list(record["groups"]) == tensors and record["p"] == 5
    assert record["checkpoint"] == len(tiny_run.steps) - 1  # the final one
    assert record["groups"]["left.bias"]["sampled_weights"] == 16 and record["groups"]["left.bias"]["chains"] == 2


def test_cli_per_parameter_exits_non_zero_when_a_group_diverges(tiny_run):
    result = CliRunner().invoke(estimate_command, ["--run", str(tiny_run.path), "--chains", "2", "--steps", "20",
                                                   "--batch-size", "8", "--epsilon", "1e3", "--per-parameter"])
    assert "group" in result.output  # the table is printed first
    assert_one_line_error(result, "diverged (non-finite or exploding loss); try a smaller --epsilon")


def test_cli_per_parameter_refuses_a_backend_without_restrict_before_training(tmp_path, monkeypatch):
    """Every backend restricts today: one is made not to (its CAPABILITIES without "restrict")."""
    from fastllc.backends import backend_module
    lacking = backend_module("native")
    monkeypatch.setattr(lacking, "CAPABILITIES", lacking.CAPABILITIES - {"restrict"})
    monkeypatch.setenv("FASTLLC_HOME", str(tmp_path / "home"))
    result = CliRunner().invoke(estimate_command, ["--p", "5", "--per-parameter", "--backend", "native"])
    assert_one_line_error(result, "restrict= (weight-restricted sampling) needs backend ")
    assert "not 'native'" in result.output and not (tmp_path / "home").exists()  # nothing trained or cached


@pytest.mark.parametrize("orthogonal,mala", [(True, False), (False, True)])
def test_generic_fixes_weights_alike_by_slices_and_by_mask(monkeypatch, orthogonal, mala):
    """generic fixes a layer-wise restriction's weights by slices of its buffer, a scattered one by index and
    mask (``sampling.chains.HeldWeights``): forced to the other way, the same chains to the bit."""
    model = tiny_model()
    config = SGLDConfig(chains=3, steps=25, batch_size=8, epsilon=3e-3, gamma=1.0, nbeta=5.0, orthogonal=orthogonal,
                        mala=mala)
    sliced = sample("generic", model, config, rows(model))
    monkeypatch.setattr(HeldWeights, "MAX_SLICES", 0)
    masked = sample("generic", model, config, rows(model))
    assert torch.equal(sliced.final_params, masked.final_params) and torch.equal(sliced.loss_trace, masked.loss_trace)
    if mala:
        assert torch.equal(sliced.mala_acceptance, masked.mala_acceptance)
    w_star, keep = flat_parameters(model)[2], rows(model)
    assert torch.equal(masked.final_params[~keep], w_star.expand(3, -1)[~keep])


def test_a_config_tiled_for_groups_and_sliced_back():
    """``tiled(g)``: g copies of the chains in one batch, per-chain ε repeated per group, single values as they
    are; ``chain_range(lo, hi)`` of the tiled batch gives back each group's own settings."""
    from fastllc.sampling import SGLDConfig

    config = SGLDConfig(chains=3, steps=10, epsilon=[1e-4, 2e-4, 3e-4], gamma=5.0, nbeta=[1.0, 2.0, 3.0])
    batch = config.tiled(2)
    assert batch.chains == 6 and batch.gamma == 5.0
    assert batch.epsilon == [1e-4, 2e-4, 3e-4] * 2 and batch.nbeta == [1.0, 2.0, 3.0] * 2
    second = batch.chain_range(3, 6)
    assert (second.chains, second.epsilon, second.nbeta, second.gamma) == (3, config.epsilon, config.nbeta, 5.0)
    assert SGLDConfig(chains=4, steps=10).tiled(3).chains == 12  # nothing per chain: only the count
