"""The estimator and its diagnostics on synthetic traces with known answers."""

import math

import numpy as np
import pytest
import torch

from fastllc import SGLDConfig, estimate_llc
from fastllc.errors import FastLLCError
from fastllc.llc import effective_sample_size, split_r_hat
from fastllc.sampling.contract import Samples


def samples_from(trace, init_loss=1.0, nbeta=10.0):
    chains = trace.shape[0]
    return Samples(torch.as_tensor(trace, dtype=torch.float64), init_loss, torch.full((chains,), 1e-3),
                   torch.full((chains,), 5.0), torch.full((chains,), nbeta), "synthetic", "cpu", 2.0)


def test_llc_is_nbeta_times_the_mean_excess_loss_after_burn_in():
    trace = np.array([[9.0, 1.5, 1.5, 1.5], [9.0, 1.2, 1.4, 1.6]])
    result = estimate_llc(samples_from(trace), SGLDConfig(chains=2, steps=4, burn_in=1))
    assert result.llc_per_chain == pytest.approx([5.0, 4.0])
    assert result.llc_mean == pytest.approx(4.5)
    assert result.llc_std == pytest.approx(np.std([5.0, 4.0], ddof=1))
    assert result.llc_se == pytest.approx(result.llc_std / math.sqrt(2))
    assert result.chain_steps_per_second == pytest.approx(2 * 4 / 2.0)


def test_unhealthy_chains_are_flagged_and_excluded():
    trace = np.ones((4, 50)) * 1.5
    trace[1, 30:] = np.nan  # diverged
    trace[2, 10] = 1e6  # left the basin: far above the default bound 100·max(1, L_n(w*))
    with pytest.warns(RuntimeWarning, match="2 of 4 chains"):
        result = estimate_llc(samples_from(trace), SGLDConfig(chains=4, steps=50))
    assert result.healthy == [True, False, False, True]
    assert result.healthy_chains == 2
    assert result.llc_per_chain[1] is None and result.llc_per_chain[2] is None
    assert result.llc_mean == pytest.approx(5.0)
    record = result.to_dict()
    assert "loss_trace" not in record and record["llc_per_chain"][1] is None


def test_all_chains_unhealthy_gives_nan_and_null_json():
    trace = np.full((2, 10), np.inf)
    with pytest.warns(RuntimeWarning):
        result = estimate_llc(samples_from(trace), SGLDConfig(chains=2, steps=10))
    assert math.isnan(result.llc_mean) and result.healthy_chains == 0
    assert result.to_dict()["llc_mean"] is None
    assert "NaN" not in result.to_json()


def test_diagnostics_on_independent_draws():
    rng = np.random.default_rng(0)
    iid = rng.normal(size=(4, 2000))
    assert split_r_hat(iid) == pytest.approx(1.0, abs=0.01)
    assert effective_sample_size(iid) == pytest.approx(8000, rel=0.15)


def test_ess_of_an_ar1_process_matches_theory():
    """AR(1) with coefficient ρ has integrated autocorrelation time (1 + ρ)/(1 − ρ)."""
    rng = np.random.default_rng(1)
    rho, chains, steps = 0.9, 4, 20000
    x = np.zeros((chains, steps))
    noise = rng.normal(size=(chains, steps))
    for t in range(1, steps):
        x[:, t] = rho * x[:, t - 1] + noise[:, t]
    expected = chains * steps * (1 - rho) / (1 + rho)
    assert effective_sample_size(x) == pytest.approx(expected, rel=0.2)


def test_r_hat_detects_chains_that_disagree():
    rng = np.random.default_rng(2)
    shifted = rng.normal(size=(4, 500)) + np.array([[0.0], [0.0], [3.0], [3.0]])
    assert split_r_hat(shifted) > 1.5


@pytest.mark.parametrize("init_loss", [math.nan, math.inf])
def test_a_non_finite_loss_at_w_star_is_an_error_not_diverged_chains(init_loss):
    with pytest.raises(FastLLCError, match=r"the loss at w\* is (nan|inf) \(the starting weights or data give a "
                                           r"non-finite loss\); check the model and data"):
        estimate_llc(samples_from(np.ones((2, 10)), init_loss=init_loss), SGLDConfig(chains=2, steps=10))
