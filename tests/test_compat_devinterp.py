"""The devinterp-compatible layer: arguments, result keys, draws, and agreement with devinterp itself."""

import functools
import math
import sys
import types
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from fastllc import FastLLCError, ModularMLP, SGLDConfig, estimate, make_task
from fastllc.backends import resolve_backend
from fastllc.compat.devinterp import (SGMCMC, default_nbeta, estimate_learning_coeff,
                                      estimate_learning_coeff_with_summary)


def classifier_problem(n=256, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=gen)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))
    optimiser = torch.optim.Adam(model.parameters(), 3e-2)
    for _ in range(80):
        optimiser.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimiser.step()
    return model, x, y


def evaluate(model, batch):
    inputs, targets = batch
    logits = model(inputs)
    return F.cross_entropy(logits, targets), {"logits": logits}


def test_result_keys_draws_and_defaults_follow_devinterp():
    model, x, y = classifier_problem()
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    out = estimate_learning_coeff_with_summary(
        model, loader, evaluate=evaluate, optimizer_kwargs=dict(lr=1e-3, localization=10.0), num_chains=3,
        num_draws=20, num_burnin_steps=5, num_steps_bw_draws=3, seed=1, verbose=False)
    chains = [out[f"llc-chain/{i}"] for i in range(3)]
    assert out["llc/mean"] == pytest.approx(np.mean(chains)) and out["llc/std"] == pytest.approx(np.std(chains, ddof=1))
    assert out["loss/trace"].shape == (3, 20) and out["loss/trace"].dtype == np.float32
    full = out["fastllc"].loss_trace  # every step: 5 burn-in + 20 draws × 3
    assert full.shape == (3, 65)
    np.testing.assert_array_equal(out["loss/trace"], full[:, 7::3].float().numpy())  # steps 7, 10, ..., 64
    assert out["nbeta"] == pytest.approx(default_nbeta(32)) == pytest.approx(32 / math.log(32))  # b/log b
    assert out["init_loss"] == pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-6)  # whole dataset
    assert out["llc/healthy_chains"] == 3 and out["llc/se"] == pytest.approx(out["llc/std"] / math.sqrt(3))

    online = estimate_learning_coeff_with_summary(
        model, loader, evaluate=evaluate, optimizer_kwargs=dict(lr=1e-3, localization=10.0, nbeta=7.0),
        num_chains=3, num_draws=20, seed=1, online=True, init_loss=0.5, verbose=False)
    assert online["llc/trace"].shape == (3, 20) and online["init_loss"] == 0.5
    np.testing.assert_allclose(online["llc/trace"], 7.0 * (online["loss/trace"] - 0.5), rtol=1e-5)
    np.testing.assert_allclose(online["llc/means"], online["llc/trace"].mean(0), rtol=1e-5)
    assert estimate_learning_coeff(model, loader, evaluate=evaluate, optimizer_kwargs=dict(lr=1e-3, localization=10.0),
                                   num_chains=3, num_draws=20, seed=1, verbose=False) == pytest.approx(
        estimate_learning_coeff_with_summary(model, loader, evaluate=evaluate, num_chains=3, num_draws=20, seed=1,
                                             optimizer_kwargs=dict(lr=1e-3, localization=10.0),
                                             verbose=False)["llc/mean"])


class DictDataset(Dataset):
    """Items as dicts, e.g. a tokenised text dataset."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"features": self.x[i], "label": self.y[i]}


class LossModel(nn.Module):
    """A model that computes its own loss from a batch, as devinterp's default ``evaluate`` expects."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return F.cross_entropy(self.model(batch["features"]), batch["label"])


def test_any_evaluate_and_batch_structure_runs_on_generic_and_equals_the_reference():
    model, x, y = classifier_problem()
    settings = dict(optimizer_kwargs=dict(lr=1e-3, localization=10.0, nbeta=20.0), num_chains=4, num_draws=15,
                    seed=2, verbose=False)
    pair_loader = DataLoader(TensorDataset(x, y), batch_size=16)
    fast = estimate_learning_coeff_with_summary(model, pair_loader, evaluate=evaluate, backend="generic", **settings)
    slow = estimate_learning_coeff_with_summary(model, pair_loader, evaluate=evaluate, backend="reference", **settings)
    assert fast["fastllc"].backend == "generic"
    # the same chains (same counter-based draws), batched or one at a time: fp32 summation order only
    np.testing.assert_allclose(fast["loss/trace"], slow["loss/trace"], rtol=0, atol=1e-5)

    dict_loader = DataLoader(DictDataset(x, y), batch_size=16)
    own_loss = estimate_learning_coeff_with_summary(LossModel(model), dict_loader, **settings)  # evaluate=None
    tuple_eval = estimate_learning_coeff_with_summary(
        model, dict_loader, evaluate=lambda m, b: (F.cross_entropy(m(b["features"]), b["label"]),), **settings)
    assert own_loss["fastllc"].backend == "generic"
    np.testing.assert_allclose(own_loss["loss/trace"], fast["loss/trace"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(tuple_eval["loss/trace"], fast["loss/trace"], rtol=0, atol=1e-6)


def test_unsupported_settings_are_refused_clearly():
    model, x, y = classifier_problem(n=32)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)

    class SGNHT:
        pass

    class NoiseNorm:
        pass

    rmsprop = SGMCMC.rmsprop_sgld
    cases = [(dict(sampling_method=SGNHT), "^fastllc implements sampling_method SGLD, SGMCMC.sgld and "
                                           "SGMCMC.rmsprop_sgld only, not 'SGNHT'$"),
             (dict(sampling_method=SGMCMC), "only, not 'SGMCMC'$"),  # the general class: its preconditioner= etc.
             (dict(sampling_method=rmsprop, optimizer_kwargs=dict(add_grad_correction=True)),
              "^optimizer_kwargs add_grad_correction=True is not supported by fastllc$"),
             (dict(sampling_method=rmsprop, optimizer_kwargs=dict(weight_decay=0.1)), "weight_decay=0.1"),
             (dict(sampling_method=rmsprop, optimizer_kwargs=dict(alpha=0.9, momentum=0.9)),
              "^unknown optimizer_kwargs for RMSprop-SGLD: momentum$"),
             (dict(optimizer_kwargs=dict(alpha=0.9)), "^unknown optimizer_kwargs for SGLD: alpha$"),  # SGLD has none
             (dict(sampling_method=rmsprop, optimizer_kwargs=dict(alpha=1.5)), "^rmsprop_alpha must be in \\(0, 1\\)"),
             (dict(sampling_method=rmsprop, optimizer_kwargs=dict(eps=0.0)), "^rmsprop_eps must be finite and > 0"),
             (dict(sampling_method=rmsprop, callbacks=[MalaAcceptanceRate(2, 3, 0.01, 4 / math.log(4))]),
              "^MalaAcceptanceRate is not supported with RMSprop-SGLD by fastllc"),
             (dict(optimizer_kwargs=dict(weight_decay=0.1)), "weight_decay"),
             (dict(seed=[1, 2]), "one int seed"), (dict(callbacks=[NoiseNorm()]), "NoiseNorm"),
             (dict(optimizer_kwargs=dict(lr=1e-3, momentum=0.9)), "unknown optimizer_kwargs"),
             (dict(optimizer_kwargs=dict(noise_level=0.0)), "noise_level"),  # not silently run with noise 1
             (dict(optimizer_kwargs=dict(noise_level=None)), "noise_level")]
    for kwargs, message in cases:
        with pytest.raises(FastLLCError, match=message):
            estimate_learning_coeff_with_summary(model, loader, evaluate=evaluate, num_chains=2, num_draws=3,
                                                 verbose=False, **kwargs)


def test_rmsprop_sgld_maps_onto_the_sampler_with_devinterps_names(monkeypatch):
    """``sampling_method=SGMCMC.rmsprop_sgld`` with ``alpha``/``eps`` is fastllc's RMSProp-SGLD with those
    settings: the same chains as ``fastllc.estimate`` with ``sampler="rmsprop_sgld"`` (and not as plain SGLD)."""
    monkeypatch.setitem(sys.modules, "devinterp.utils", fake_devinterp_utils())  # evaluate_ce: the model as given
    evaluate_ce = sys.modules["devinterp.utils"].evaluate_ce
    model, x, y = classifier_problem(n=64)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    kwargs = dict(lr=1e-3, localization=10.0, alpha=0.9, eps=0.05)  # not devinterp's defaults (0.99, 0.1)
    out = estimate_learning_coeff_with_summary(model, loader, evaluate=evaluate_ce, sampling_method=SGMCMC.rmsprop_sgld,
                                               optimizer_kwargs=kwargs, num_chains=2, num_draws=10,
                                               num_burnin_steps=2, seed=5, verbose=False)
    config = SGLDConfig(chains=2, steps=12, burn_in=2, seed=5, epsilon=1e-3, gamma=10.0, nbeta=default_nbeta(8),
                        batch_size=8, sampler="rmsprop_sgld", rmsprop_alpha=0.9, rmsprop_eps=0.05)
    direct = estimate(model, (x, y), F.cross_entropy, config)
    assert out["fastllc"].backend == direct.backend == "generic"
    assert torch.equal(out["fastllc"].loss_trace, direct.loss_trace)  # the same run, setting for setting
    defaults = estimate(model, (x, y), F.cross_entropy, SGLDConfig(**{**config.__dict__, "rmsprop_alpha": 0.99}))
    plain = estimate(model, (x, y), F.cross_entropy, SGLDConfig(**{**config.__dict__, "sampler": "sgld"}))
    assert not torch.equal(defaults.loss_trace, direct.loss_trace)  # alpha reached the sampler
    assert not torch.equal(plain.loss_trace, direct.loss_trace)


def test_rmsprop_sgld_agrees_with_devinterps():
    """devinterp 1.3.2's ``SGMCMC.rmsprop_sgld`` and fastllc's on the same model and settings: λ̂ within 4
    combined standard errors (as the SGLD agreement test below)."""
    pytest.importorskip("devinterp")
    from devinterp.optim import SGMCMC as DevinterpSGMCMC
    from devinterp.slt.sampler import estimate_learning_coeff_with_summary as devinterp_estimate

    model, x, y = classifier_problem(n=512)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    init_loss = F.cross_entropy(model(x), y).item()
    chains, draws = 8, 200

    def run(estimator, sampling_method):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return estimator(model, loader, evaluate=evaluate, sampling_method=sampling_method,
                             optimizer_kwargs=dict(lr=1e-3, localization=10.0, alpha=0.9, eps=0.05),
                             num_chains=chains, num_draws=draws, num_burnin_steps=50, init_loss=init_loss, seed=0,
                             device="cpu", verbose=False)

    theirs = run(devinterp_estimate, DevinterpSGMCMC.rmsprop_sgld)
    ours = run(estimate_learning_coeff_with_summary, DevinterpSGMCMC.rmsprop_sgld)
    assert ours["fastllc"].backend == "generic" and ours["llc/healthy_chains"] == chains
    se = math.hypot(theirs["llc/std"], ours["llc/std"]) / math.sqrt(chains)
    # independent chains of the same sampler: the difference of the means is N(0, se²); 4 se fails by chance
    # once in ~16,000 runs (seeded on both sides: this pair is 0.65 se apart). With 128 chains each, devinterp
    # gave 1.052 ± 0.015 and fastllc 1.043 ± 0.015 (0.4 se); plain SGLD with these settings gives 0.75 ± 0.07.
    assert abs(ours["llc/mean"] - theirs["llc/mean"]) < 4 * se


def test_a_devinterp_script_switched_by_its_import_agrees_with_devinterp():
    """The same model and settings through devinterp 1.3.2 and through fastllc: λ̂ within statistical error."""
    pytest.importorskip("devinterp")
    from devinterp.optim.sgld import SGLD
    from devinterp.slt.mala import MalaAcceptanceRate
    from devinterp.slt.sampler import estimate_learning_coeff_with_summary as devinterp_estimate
    from devinterp.utils import evaluate_ce

    model, x, y = classifier_problem(n=512)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    init_loss = F.cross_entropy(model(x), y).item()  # both on L_n(w*): devinterp's own is a batch estimate
    chains, draws = 8, 200

    def run(estimator, seed):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return estimator(model, loader, evaluate=evaluate, sampling_method=SGLD,
                             callbacks=[MalaAcceptanceRate(chains, draws, 1e-3, nbeta=default_nbeta(32))],
                             optimizer_kwargs=dict(lr=1e-3, localization=10.0), num_chains=chains, num_draws=draws,
                             num_burnin_steps=50, init_loss=init_loss, seed=seed, device="cpu", verbose=False)

    theirs, ours = run(devinterp_estimate, 0), run(estimate_learning_coeff_with_summary, 0)
    assert set(theirs) <= set(ours)  # every devinterp key is there
    assert ours["loss/trace"].shape == theirs["loss/trace"].shape
    se = math.hypot(theirs["llc/std"], ours["llc/std"]) / math.sqrt(chains)
    # two independent sets of 8 chains of the same sampler: the difference of the means is N(0, se²);
    # 4 se fails by chance once in ~16,000 runs, while a wrong nβ, lr/2 or noise scale moves λ̂ by ≥ 30%
    assert abs(ours["llc/mean"] - theirs["llc/mean"]) < 4 * se
    assert abs(ours["mala_accept/mean"] - theirs["mala_accept/mean"]) < 0.1  # theirs is biased by one 0 per chain

    mlp = ModularMLP(7, 5, 13)  # devinterp's evaluate_ce names the criterion: the study's MLP keeps its own backend
    pairs, labels = make_task(7, "add", seed=0).train_data()
    native = estimate_learning_coeff_with_summary(mlp, DataLoader(TensorDataset(pairs, labels), batch_size=8),
                                                  evaluate=evaluate_ce, num_chains=2, num_draws=5, verbose=False)
    assert native["fastllc"].backend == resolve_backend("auto", torch.device("cpu"))  # native, or torch without a compiler


class MalaAcceptanceRate:
    """Stands in for devinterp's callback (matched by class name), so this test needs no devinterp."""

    def __init__(self, num_chains, num_draws, learning_rate, nbeta):
        self.learning_rate, self.nbeta = learning_rate, nbeta
        self.mala_acceptance_rate = torch.zeros(num_chains, num_draws - 1)


def test_a_mala_callback_holds_its_results_and_must_share_the_samplers_settings():
    model, x, y = classifier_problem(n=32)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    nbeta = 8 / math.log(8)  # devinterp's default for batch size 8
    callback = MalaAcceptanceRate(2, 5, 1e-3, nbeta)
    out = estimate_learning_coeff_with_summary(model, loader, evaluate=evaluate, callbacks=[callback],
                                               optimizer_kwargs=dict(lr=1e-3), num_chains=2, num_draws=5,
                                               verbose=False)
    assert callback.mala_acceptance_rate.shape == (2, 4)
    assert torch.equal(callback.mala_acceptance_rate, torch.as_tensor(out["mala_accept/trace"]))
    assert (callback.mala_acceptance_rate > 0).all()  # filled in, not devinterp's initial zeros
    with pytest.raises(FastLLCError, match="MalaAcceptanceRate has learning_rate=0.01"):
        estimate_learning_coeff_with_summary(model, loader, evaluate=evaluate, callbacks=[MalaAcceptanceRate(2, 5, 1e-2, nbeta)],
                                             optimizer_kwargs=dict(lr=1e-3), num_chains=2, num_draws=5, verbose=False)


def fake_devinterp_utils():
    """A module object named ``devinterp.utils`` with devinterp 1.3.2's ``evaluate``, ``make_evaluate`` and
    ``evaluate_ce`` (same source), so that their detection is tested whether or not devinterp is installed."""
    module = types.ModuleType("devinterp.utils")
    exec("from functools import partial\n"
         "import torch.nn.functional as F\n"
         "def evaluate(criterion, model, data):\n"
         "    x, y = data\n"
         "    y_pred = model(x)\n"
         "    return criterion(y_pred, y), {'output': y_pred}\n"
         "def make_evaluate(criterion):\n"
         "    return partial(evaluate, criterion)\n"
         "evaluate_ce = partial(evaluate, F.cross_entropy)\n", module.__dict__)
    return module


def test_devinterps_evaluate_ce_is_detected_without_devinterp(monkeypatch):
    utils = fake_devinterp_utils()
    monkeypatch.setitem(sys.modules, "devinterp.utils", utils)
    assert utils.evaluate_ce.func.__module__ == "devinterp.utils"  # what devinterp's own object carries
    mlp = ModularMLP(7, 5, 13)
    pairs, labels = make_task(7, "add", seed=0).train_data()
    loader = DataLoader(TensorDataset(pairs, labels), batch_size=8)
    settings = dict(optimizer_kwargs=dict(lr=1e-3, localization=5.0), num_chains=2, num_draws=10, seed=3,
                    verbose=False)
    native = estimate_learning_coeff_with_summary(mlp, loader, evaluate=utils.evaluate_ce, **settings)
    made = estimate_learning_coeff_with_summary(mlp, loader, evaluate=utils.make_evaluate(F.cross_entropy),
                                                **settings)
    # the study's MLP keeps its backend (native, or torch without a compiler)
    assert native["fastllc"].backend == made["fastllc"].backend == resolve_backend("auto", torch.device("cpu"))

    def evaluate(criterion, model, data):  # the same function, but not devinterp's: run as given
        return utils.evaluate(criterion, model, data)

    own = estimate_learning_coeff_with_summary(mlp, loader, evaluate=functools.partial(evaluate, F.cross_entropy),
                                               **settings)
    assert own["fastllc"].backend == "generic"
    # the criterion taken out of evaluate_ce is the one that runs: the same chains (same counter-based draws)
    # as through evaluate itself, to fp32 summation order (batched vs vmapped: measured 1.2e-7 = 1 ulp after
    # 10 steps; 1e-5 as tests/test_backend_generic.py, while a wrong criterion moves the losses by ~0.1)
    np.testing.assert_allclose(native["loss/trace"], own["loss/trace"], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(native["loss/trace"], made["loss/trace"])


def devinterp_masks(model, moving="2.*"):
    """devinterp's optimize_over_per_model_param: a bool mask for every parameter, True on the ``moving`` ones."""
    import fnmatch
    return {name: torch.full_like(p, fnmatch.fnmatchcase(name, moving), dtype=torch.bool)
            for name, p in model.named_parameters()}


@pytest.mark.parametrize("path", ["evaluate_ce", "evaluate"])
def test_optimize_over_per_model_param_maps_onto_restrict(monkeypatch, path):
    """Both paths (devinterp's evaluate_ce run natively, any evaluate through the wrapper module, whose parameter
    names carry a prefix): the same chains as ``fastllc.estimate(restrict=...)``, not the unrestricted ones."""
    monkeypatch.setitem(sys.modules, "devinterp.utils", fake_devinterp_utils())
    model, x, y = classifier_problem(n=64)
    masks = devinterp_masks(model)
    masks["0.bias"][3] = True  # element-wise: one more weight
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    how = sys.modules["devinterp.utils"].evaluate_ce if path == "evaluate_ce" else evaluate
    out = estimate_learning_coeff_with_summary(model, loader, evaluate=how,
                                               optimizer_kwargs=dict(lr=1e-3, localization=10.0), num_chains=2, num_draws=10, seed=5, verbose=False,
                                               optimize_over_per_model_param=masks)
    config = SGLDConfig(chains=2, steps=10, seed=5, epsilon=1e-3, gamma=10.0, nbeta=default_nbeta(8), batch_size=8)
    if path == "evaluate_ce":  # the native path: the model itself, with the same names
        direct = estimate(model, (x, y), F.cross_entropy, config, restrict=masks)
        assert torch.equal(out["fastllc"].loss_trace, direct.loss_trace)  # the same run, mask for mask
    unrestricted = estimate(model, (x, y), F.cross_entropy, config)
    assert not torch.equal(out["fastllc"].loss_trace, unrestricted.loss_trace)
    assert out["fastllc"].backend == "generic" and out["llc/healthy_chains"] == 2


def test_a_bad_optimize_over_per_model_param_is_a_one_line_error():
    model, x, y = classifier_problem(n=32)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    masks = devinterp_masks(model)
    cases = [({"2.weight": masks["2.weight"]},
              r"^optimize_over_per_model_param has no mask for parameter '0\.weight'; give one for every parameter of "
              r"the model \(all False to keep it fixed\)$"),
             ({**masks, "2.wieght": masks["2.weight"]},
              r"^optimize_over_per_model_param: mask for '2\.wieght', which is not a trainable parameter of the "
              r"model; closest: '2\.weight'"),
             ({**masks, "0.bias": torch.ones(3, dtype=torch.bool)},
              r"^optimize_over_per_model_param: the mask for '0\.bias' has shape \(3,\), the parameter \(8,\); give a "
              r"boolean mask of the parameter's shape$"),
             (devinterp_masks(model, moving="none"), r"^optimize_over_per_model_param selects no weights"),
             ([masks], r"^optimize_over_per_model_param must be a dict \{parameter name: bool mask of its shape\}, "
                       r"not list$")]
    for masks_given, message in cases:
        with pytest.raises(FastLLCError, match=message):
            estimate_learning_coeff_with_summary(model, loader, evaluate=evaluate, num_chains=2, num_draws=3,
                                                 verbose=False, optimize_over_per_model_param=masks_given)


def test_weight_restricted_llc_agrees_with_devinterps():
    """devinterp 1.3.2's ``optimize_over_per_model_param`` and fastllc's on the same model, settings and masks (the
    last layer and every other bias of the first, element-wise): λ̂ within 4 combined standard errors."""
    pytest.importorskip("devinterp")
    from devinterp.optim.sgld import SGLD
    from devinterp.slt.sampler import estimate_learning_coeff_with_summary as devinterp_estimate

    model, x, y = classifier_problem(n=512)
    masks = devinterp_masks(model)
    masks["0.bias"][::2] = True
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    init_loss = F.cross_entropy(model(x), y).item()  # both on L_n(w*): devinterp's own is a batch estimate
    chains, draws = 16, 400  # ~5 s for devinterp's serial chains; enough that the unrestricted λ̂ is far outside

    def run(estimator, masks=masks):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return estimator(model, loader, evaluate=evaluate, sampling_method=SGLD,
                             optimizer_kwargs=dict(lr=1e-3, localization=10.0), num_chains=chains, num_draws=draws,
                             num_burnin_steps=50, init_loss=init_loss, seed=0, device="cpu", verbose=False,
                             optimize_over_per_model_param=masks)

    theirs, ours = run(devinterp_estimate), run(estimate_learning_coeff_with_summary)
    assert ours["llc/healthy_chains"] == chains
    se = math.hypot(theirs["llc/std"], ours["llc/std"]) / math.sqrt(chains)
    # independent chains of the same sampler: the difference of the means is N(0, se²); 4 se fails by chance
    # once in ~16,000 runs (seeded on both sides: measured devinterp 0.109 ± 0.021, fastllc 0.125 ± 0.018)
    assert abs(ours["llc/mean"] - theirs["llc/mean"]) < 4 * se
    unrestricted = run(estimate_learning_coeff_with_summary, masks=None)  # measured 0.71 ± 0.04
    assert abs(unrestricted["llc/mean"] - theirs["llc/mean"]) > 4 * se  # the test can tell a restriction apart


def test_per_layer_llc_in_one_batch_agrees_with_devinterps_restricted_runs():
    """``estimate_groups`` (both layers' chains in one batch, a mask per chain) against one devinterp 1.3.2
    ``optimize_over_per_model_param`` run per layer, same model and settings: each layer's λ̂ within 4 combined
    standard errors. 8 chains × 200 draws per layer (~2 × 3 s for devinterp's serial chains): the two layers' λ̂
    are > 4 se apart (a chain given the other layer's mask fails), and the last layer's is > 4 se from the
    unrestricted λ̂: the agreement is about the restriction of each chain."""
    pytest.importorskip("devinterp")
    from devinterp.optim.sgld import SGLD
    from devinterp.slt.sampler import estimate_learning_coeff_with_summary as devinterp_estimate
    from fastllc.api import estimate_groups

    model, x, y = classifier_problem(n=512)
    init_loss = F.cross_entropy(model(x), y).item()  # both on L_n(w*): devinterp's own is a batch estimate
    chains, draws, burn_in, batch = 8, 200, 50, 32
    layers = {"first": "0.*", "last": "2.*"}
    ours = estimate_groups(model, (x, y), groups=layers, chains=chains, steps=burn_in + draws, burn_in=burn_in,
                           epsilon=1e-3, gamma=10.0, nbeta=default_nbeta(batch), batch_size=batch, init_loss=init_loss,
                           seed=0, backend="generic")
    loader = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True)
    theirs = {}
    for name, pattern in layers.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs[name] = devinterp_estimate(
                model, loader, evaluate=evaluate, sampling_method=SGLD,
                optimizer_kwargs=dict(lr=1e-3, localization=10.0), num_chains=chains, num_draws=draws, num_burnin_steps=burn_in, init_loss=init_loss, seed=0,
                device="cpu", verbose=False, optimize_over_per_model_param=devinterp_masks(model, moving=pattern))
    se = {name: math.hypot(theirs[name]["llc/std"], ours[name].llc_std) / math.sqrt(chains) for name in layers}
    for name in layers:
        assert ours[name].healthy_chains == chains
        # independent chains of the same sampler: the difference of the means is N(0, se²); 4 se fails by chance
        # once in ~16,000 runs (seeded on both sides: measured first 0.683 ± 0.109 devinterp, 0.717 ± 0.070 fastllc;
        # last 0.0046 ± 0.0049, 0.0271 ± 0.0135: 0.26 and 1.56 combined se apart)
        assert abs(ours[name].llc_mean - theirs[name]["llc/mean"]) < 4 * se[name], name
    assert abs(theirs["first"]["llc/mean"] - ours["last"].llc_mean) > 4 * max(se.values())  # layers told apart
    unrestricted = estimate(model, (x, y), chains=chains, steps=burn_in + draws, burn_in=burn_in, epsilon=1e-3,
                            gamma=10.0, nbeta=default_nbeta(batch), batch_size=batch, init_loss=init_loss, seed=0)
    assert abs(unrestricted.llc_mean - ours["last"].llc_mean) > 4 * se["last"]  # and the restriction from none (0.746)
