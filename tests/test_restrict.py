"""Weight-restricted sampling (``estimate(restrict=...)``, ``sampling/restrict.py``) on reference and generic."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastllc import FastLLCError, SGLDConfig, estimate
from fastllc.backends import generic, reference, sample
from fastllc.sampling import InjectedRandomness
from fastllc.sampling.contract import flat_parameters
from fastllc.sampling.restrict import selection_mask

BACKENDS = {"reference": reference, "generic": generic}


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))  # d = 20 + 12 = 32


def data(n=40):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, generator=gen), torch.randint(2, (n,), generator=gen)


def element_mask():
    """Half of the first layer's weights (a checkerboard) and the second layer's bias."""
    return {"0.weight": (torch.arange(15).reshape(5, 3) % 2 == 0), "2.bias": torch.ones(2, dtype=torch.bool)}


def injected(model, chains, steps, n, m, seed=3):
    return InjectedRandomness.seeded(chains, steps, n, m, flat_parameters(model)[2].numel(), seed)


def run(backend, model, config, restrict, noise=None):
    x, y = data()
    mask = None if restrict is None else selection_mask(model, restrict)
    keywords = {"trace": True} if backend == "generic" else {}
    return BACKENDS[backend].sample(model, x, y, F.cross_entropy, config, randomness=noise, restrict=mask, **keywords)


@pytest.mark.parametrize("backend", ["reference", "generic"])
@pytest.mark.parametrize("sampler,orthogonal", [("sgld", False), ("sgld", True), ("rmsprop_sgld", False)])
def test_unselected_weights_stay_at_w_star_bit_for_bit_and_selected_ones_move(backend, sampler, orthogonal):
    model = tiny_model()
    w_star = flat_parameters(model)[2]
    config = SGLDConfig(chains=3, steps=30, batch_size=8, epsilon=[1e-2, 3e-3, 1e-3], gamma=[3.0, 1.0, 0.0],
                        nbeta=5.0, orthogonal=orthogonal, sampler=sampler)
    samples = run(backend, model, config, element_mask())
    keep = selection_mask(model, element_mask())
    frozen = samples.final_params[:, ~keep]
    assert torch.equal(frozen, w_star[~keep].expand_as(frozen))  # exactly w*, every chain
    assert (samples.final_params[:, keep] != w_star[keep]).all()  # every selected weight moved in every chain
    assert torch.isfinite(samples.loss_trace).all()


@pytest.mark.parametrize("orthogonal", [False, True])
@pytest.mark.parametrize("sampler", ["sgld", "rmsprop_sgld"])
def test_reference_and_generic_follow_the_same_restricted_trajectories(orthogonal, sampler):
    model = tiny_model()
    chains, steps, m = 3, 40, 8
    noise = injected(model, chains, steps, len(data()[1]), m)
    config = SGLDConfig(chains=chains, steps=steps, batch_size=m, epsilon=[1e-2, 3e-3, 1e-3], gamma=[3.0, 1.0, 0.0],
                        nbeta=[5.0, 10.0, 20.0], orthogonal=orthogonal, sampler=sampler)
    ref = run("reference", model, config, element_mask(), noise)
    fast = run("generic", model, config, element_mask(), noise)
    # as tests/test_backend_generic.py: the same fp32 formulas batched, only the summation order differs
    # (~1e-7 relative per step); 1e-5 as there, while a wrong term moves the weights by > 1e-3
    torch.testing.assert_close(fast.final_params, ref.final_params, rtol=0, atol=1e-5)
    torch.testing.assert_close(fast.loss_trace, ref.loss_trace, rtol=0, atol=1e-5)
    assert (ref.final_params - flat_parameters(model)[2]).abs().max() > 1e-2  # the chains travelled


@pytest.mark.parametrize("backend", ["reference", "generic"])
@pytest.mark.parametrize("orthogonal", [False, True])
def test_restricting_to_every_weight_equals_the_unrestricted_run_exactly(backend, orthogonal):
    model = tiny_model()
    config = SGLDConfig(chains=2, steps=25, batch_size=8, epsilon=3e-3, gamma=1.0, nbeta=5.0, orthogonal=orthogonal)
    unrestricted = run(backend, model, config, None)
    everything = run(backend, model, config, "*")
    assert torch.equal(everything.final_params, unrestricted.final_params)
    assert torch.equal(everything.loss_trace, unrestricted.loss_trace)


def test_a_name_a_glob_a_module_and_a_mask_denoting_the_same_weights_give_the_same_result():
    model, (x, y) = tiny_model(), data()
    full = {"2.weight": torch.ones(2, 5, dtype=torch.bool), "2.bias": torch.ones(2, dtype=torch.bool)}
    selections = [["2.weight", "2.bias"], "2.*", model[2], full, [model[2], "2.bias"], torch.arange(32) >= 20]
    masks = [selection_mask(model, s) for s in selections]
    assert all(torch.equal(mask, masks[0]) for mask in masks) and int(masks[0].sum()) == 12
    assert torch.equal(masks[0], torch.arange(32) >= 20)  # the last 12 of named_parameters' flat order
    results = [estimate(model, (x, y), chains=2, steps=20, batch_size=8, epsilon=3e-3, restrict=s, backend="generic")
               for s in selections]
    assert len({r.llc_mean for r in results}) == 1
    unrestricted = estimate(model, (x, y), chains=2, steps=20, batch_size=8, epsilon=3e-3, backend="generic")
    assert results[0].llc_mean != unrestricted.llc_mean


def test_estimate_picks_a_backend_that_restricts_and_refuses_one_that_cannot():
    model, (x, y) = tiny_model(), data()
    for backend in ("auto", "reference", "generic"):
        result = estimate(model, (x, y), chains=2, steps=5, batch_size=8, restrict="0.*", backend=backend)
        assert result.healthy_chains == 2
        # nβ's default is unchanged by a restriction: n/log n of the training examples
        nbeta = torch.as_tensor(result.nbeta, dtype=torch.float64).reshape(-1)
        assert nbeta.tolist() == pytest.approx([40 / math.log(40)] * len(nbeta))
    # the study's fast backends restrict too, but run only the study's MLP: refused for this model in one line
    with pytest.raises(FastLLCError, match=r"^the torch backend runs the study's ModularMLP with cross-entropy; "
                                           r"use --backend reference for other models or losses$"):
        estimate(model, (x, y), chains=2, steps=5, restrict="0.*", backend="torch", batch_size=8)


def test_a_backend_without_the_capability_is_never_handed_a_mask(monkeypatch):
    """Every backend restricts today; one that did not (its CAPABILITIES without "restrict") is refused by the
    registry before its ``sample`` is called, so it can never run a restricted estimate unrestricted."""
    from fastllc.backends import backend_module
    native = backend_module("native")
    monkeypatch.setattr(native, "CAPABILITIES", native.CAPABILITIES - {"restrict"})
    monkeypatch.setattr(native, "sample", lambda *a, **k: pytest.fail("handed a mask"))
    model, (x, y) = tiny_model(), data()
    with pytest.raises(FastLLCError, match=r"^restrict= \(weight-restricted sampling\) needs backend "  # those that run it
                                           r"'generic' or 'reference', not 'native'$"):
        sample(model, x, y, F.cross_entropy, SGLDConfig(chains=1, steps=2), backend="native",
               restrict=selection_mask(model, "0.*"))


class Outside(nn.Module):
    pass


BAD = [
    ("1.weight", r"^restrict: '1\.weight' matches no trainable parameter of the model; closest: '2\.weight', "
                 r"'0\.weight' \(see model\.named_parameters\(\)\)$"),
    ("layer.*", r"^restrict: 'layer\.\*' matches no trainable parameter of the model; closest: "),
    ({"0.weight": torch.ones(3, 5, dtype=torch.bool)},
     r"^restrict: the mask for '0\.weight' has shape \(3, 5\), the parameter \(5, 3\); give a boolean mask of the "
     r"parameter's shape$"),
    ({"0.wieght": torch.ones(5, 3, dtype=torch.bool)},
     r"^restrict: mask for '0\.wieght', which is not a trainable parameter of the model; closest: '0\.weight'"),
    ({"0.bias": torch.tensor([0, 2, 1, 0, 1])}, r"^restrict: the mask for '0\.bias' must be boolean \(or 0/1\)"),
    ({"0.bias": torch.zeros(5, dtype=torch.bool)}, r"^restrict selects no weights \(an empty list, or every mask is "
                                                   r"False\); select at least one weight, or drop restrict"),
    ([], r"^restrict selects no weights"),
    (nn.Linear(3, 5), r"^restrict: the Linear given is not a submodule of the model; pass one of the model's own "
                      r"modules \(model\.named_modules\(\)\)$"),
    (nn.Tanh, r"^restrict takes parameter names, glob patterns, submodules, a dict \{name: bool mask\}, a bool tensor "
              r"over the flat weights or a list of those, not type$"),
    (torch.ones(31, dtype=torch.bool),
     r"^restrict: a flat mask has shape \(31,\), the model has 32 trainable weights; give a bool tensor of shape "
     r"\(32,\) in named_parameters\(\) order, or a dict \{name: mask of the parameter's shape\}$"),
    (torch.arange(32) % 3, r"^restrict: the flat mask must be boolean \(or 0/1\), got other values$"),
    (3, r"not int$"),
]


@pytest.mark.parametrize("restrict,message", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_a_bad_selection_is_a_one_line_error_before_any_sampling(restrict, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, (x, y) = tiny_model(), data()
    before = flat_parameters(model)[2]
    with pytest.raises(FastLLCError, match=message) as error:
        estimate(model, (x, y), chains=2, steps=5, restrict=restrict)
    assert "\n" not in str(error.value)
    assert torch.equal(flat_parameters(model)[2], before) and sorted(tmp_path.iterdir()) == []


def test_a_submodule_without_trainable_parameters_is_refused():
    model = tiny_model()
    with pytest.raises(FastLLCError, match=r"^restrict: the Tanh given holds no trainable parameter of the model$"):
        selection_mask(model, model[1])


def test_mala_acceptance_is_recorded_in_the_restricted_space():
    """generic's MALA sees ∇U restricted to the selected weights: with every weight selected it is the
    unrestricted run's acceptance exactly; restricted, a probability of every step."""
    model, (x, y) = tiny_model(), data()
    config = SGLDConfig(chains=2, steps=20, batch_size=8, epsilon=3e-3, gamma=1.0, nbeta=5.0, mala=True)
    unrestricted = generic.sample(model, x, y, F.cross_entropy, config)
    everything = generic.sample(model, x, y, F.cross_entropy, config, restrict=selection_mask(model, "*"))
    assert torch.equal(everything.mala_acceptance, unrestricted.mala_acceptance)
    restricted = generic.sample(model, x, y, F.cross_entropy, config, restrict=selection_mask(model, "2.*"))
    acceptance = restricted.mala_acceptance
    assert ((acceptance >= 0) & (acceptance <= 1)).all() and not torch.equal(acceptance, unrestricted.mala_acceptance)


def test_the_result_records_how_many_weights_were_sampled():
    import fastllc
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    x, y = torch.randn(40, 3), torch.randint(0, 2, (40,))
    restricted = fastllc.estimate(model, (x, y), chains=2, steps=20, batch_size=8, restrict="2.*")
    assert restricted.sampled_weights == 4 * 2 + 2 and restricted.to_dict()["sampled_weights"] == 10
    assert fastllc.estimate(model, (x, y), chains=2, steps=20, batch_size=8).sampled_weights is None
