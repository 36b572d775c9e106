"""fastllc.calibrate: a grid of SGLD settings as one batched run, the recommendation rule on models whose λ is
known, bad grids, a grid that diverges everywhere, the figure and the `calibrate` command."""

import json
import math
import os
import statistics

import click
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from fastllc import FastLLCError
from fastllc.analysis.plots import plot_calibration
from fastllc.calibration import (DRIFT_LIMIT, Z90, CalibrationResult, calibrate, cell_flags, first_order_error,
                                 interval_of, recommend)
from fastllc.cli.calibrate import calibrate_command
from fastllc.theory.dln import dln_data, dln_learning_coefficient, dln_teacher, half_squared_error

N = 2000
NBETA = N / math.log(N)  # the default nβ, ≈ 263
SCALED = (0.003, 0.01, 0.03, 0.1)  # ε·nβ: from under-mixed in 1500 steps to ~10% discretisation bias


def linear_regression(d=6, seed=3):
    """A regular model at its least-squares minimum: λ = d/2 (as in tests/test_known_answers.py)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=gen)
    y = (x @ torch.randn(d, generator=gen) + torch.randn(N, generator=gen)).unsqueeze(1)
    model = nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x.double(), y.double()).solution.float().reshape(1, d))
    return model, (x, y)


@pytest.fixture(scope="module")
def dln_calibration():
    """(3,3,3) deep linear network, rank-1 teacher: Aoyagi's λ = 4 (d/2 would be 9). One batched run of
    4 ε × 1 nβ × 1 γ cells × 4 chains × 1500 steps, plus an ε far too large (diverges)."""
    teacher = dln_teacher((3, 3, 3), 1, seed=0)
    data = dln_data(teacher, N, seed=0)
    return calibrate(teacher, data, half_squared_error, epsilons=[s / NBETA for s in SCALED] + [10.0],
                     nbetas=[NBETA], gammas=[1.0], chains=4, steps=1500, burn_in=300, batch_size=500,
                     backend="generic", seed=0)


def test_recommended_cell_of_a_dln_is_near_aoyagis_lambda(dln_calibration):
    """Tolerance 25% of λ = 4: the recommended cell's 4 chains × 1200 draws have se ≈ 0.3 (7.5%); on this
    network SGLD's λ̂ at the hand-tuned ε·nβ = 0.03 is within 10% (tests/test_dln.py), so 25% ≈ 2 se plus
    the grid's bias, and it excludes d/2 = 9 and the under-mixed smallest cell (≈ 2.7)."""
    result = dln_calibration
    cell = result.recommended_cell
    assert cell is not None and not cell.flags and cell.healthy_fraction == 1
    assert cell.llc_mean == pytest.approx(dln_learning_coefficient((3, 3, 3), 1), rel=0.25)
    assert result.settings() == dict(epsilon=cell.epsilon, nbeta=cell.nbeta, gamma=cell.gamma)
    assert result.reason.startswith(f"ε = {cell.epsilon:g}, nβ = {cell.nbeta:g}, γ = 1")
    diverged = result.cells[-1]
    assert diverged.epsilon == 10.0 and diverged.flags == ["diverged"] and diverged.healthy_fraction == 0
    assert math.isnan(diverged.llc_mean)


def test_grid_is_one_batch_with_per_cell_statistics(dln_calibration):
    result = dln_calibration
    assert [c.epsilon for c in result.cells] == pytest.approx([s / NBETA for s in SCALED] + [10.0])
    assert all(c.chains == 4 and c.nbeta == NBETA and c.gamma == 1.0 for c in result.cells)
    assert result.mean_traces.shape == (5, 1500) and result.n == N and result.default_nbeta == NBETA
    for cell in result.cells[:-1]:
        assert math.isfinite(cell.drift) and math.isfinite(cell.r_hat) and cell.ess > 0
        assert cell.mala_acceptance is None  # not asked for
    record = json.loads(result.to_json())  # NaN becomes null: strict JSON
    assert record["cells"][-1]["llc_mean"] is None and record["recommended"] == result.recommended
    assert record["cells"][-1]["flags"] == ["diverged"]


def test_recommended_cell_of_linear_regression_is_d_over_2():
    """λ = d/2 = 3 with the default grid (step scales 0.1 and 0.05 of the measured κ, nβ = n/log n) and the
    default coarse burn-in, after which the rule takes s = 0.05 (``SETTLED_STEP_SCALE``). Tolerance 20%:
    se ≈ 0.25 (8%) with 4 chains × 600 draws; discretisation bias at s = 0.05 about s/4 ≈ 1% on the stiffest
    direction, less on the others."""
    model, data = linear_regression()
    result = calibrate(model, data, half_squared_error, gammas=[1.0], chains=4, steps=800, batch_size=500,
                       backend="generic", mala=True)
    x = data[0].double()
    exact_kappa = float(torch.linalg.eigvalsh(x.T @ x / len(x)).max())  # the Hessian of ½(xw − y)² is xᵀx/n
    # Power iteration's Rayleigh quotient approaches the top eigenvalue from below at the rate (λ₂/λ₁)^k; the top
    # two of these six are within a few percent, so 30 iterations leave ~0.2%; the step scale needs a few percent.
    assert exact_kappa * 0.98 <= result.kappa <= exact_kappa * (1 + 1e-9)
    assert [c.nbeta for c in result.cells] == pytest.approx([NBETA, NBETA])  # nβ = n/log n only
    # The minibatch gradient's variance, exactly: per-example gradients (xw − y)·x at w*, their variance over
    # examples, / m. The calibration samples 32 minibatches: relative sd √(2/31) ≈ 25%; 2 sd is the bound.
    residual = (x @ model.weight.detach().double().T - data[1].double())
    exact_noise = float((residual * x).var(dim=0).mean() / 500)
    assert result.gradient_noise == pytest.approx(exact_noise, rel=0.5)
    assert [c.step_scale for c in result.cells] == pytest.approx([0.05, 0.1])
    scales = [c.epsilon * c.nbeta * (exact_kappa + c.nbeta * result.gradient_noise) for c in result.cells]
    assert scales == pytest.approx([0.05, 0.1], rel=0.02)
    chosen = result.recommended_cell
    assert result.coarse_burn_in is not None and result.coarse_burn_in["steps"] == 200
    assert chosen.step_scale == pytest.approx(0.05) and chosen.llc_mean == pytest.approx(3.0, rel=0.2)
    band = result.interval
    assert band.low < chosen.llc_mean < band.high and band.gamma_term == 0.0
    # the first-order error at s from 2s: twice their difference (λ̂ affine in ε)
    assert band.step_term == pytest.approx(2 * abs(chosen.llc_mean - result.cells[1].llc_mean))
    assert all(0 <= c.mala_acceptance <= 1 for c in result.cells)
    assert all(0 <= c.locality < 0.01 for c in result.cells)  # λ/nβ ≪ the zero predictor's extra loss


def cell(epsilon, llc, se=0.1, nbeta=1.0, gamma=1.0, healthy=1.0, drift=0.0, relative=0.0, r_hat=1.0, scale=None,
         locality=None):
    return dict(epsilon=epsilon, nbeta=nbeta, gamma=gamma, llc_mean=llc, llc_se=se, healthy_fraction=healthy,
                drift=drift, drift_relative=relative, r_hat=r_hat,
                step_scale=epsilon / 10 if scale is None else scale, locality=locality)


def test_rule_takes_the_step_scale_nearest_the_target():
    """Cells at s = 0.025 … 0.4: the one at s = 0.1, whatever the λ̂ (nothing rewards a plateau)."""
    cells = [cell(e, llc) for e, llc in ((0.25, 5.0), (0.5, 9.0), (1.0, 9.1), (2.0, 9.2), (4.0, 14.0))]
    best, reason, hint = recommend(cells, default_nbeta=1.0)
    assert best == 2 and hint is None
    assert reason.startswith("ε = 1, nβ = 1, γ = 1: the step scale ε·nβ·κ = 0.1 nearest 0.1, among cells whose")
    cells[2].update(drift=DRIFT_LIMIT + 0.1, drift_relative=0.05)  # significant but small: not drifting
    assert cell_flags(cells[2]) == [] and recommend(cells, 1.0)[0] == 2
    cells[2]["drift_relative"] = 0.2  # significant and large: drifting, still recommended, the reason says so
    best, reason, _ = recommend(cells, 1.0)
    assert cell_flags(cells[2]) == ["drifting"] and best == 2
    assert reason.endswith("; its chains are drifting (λ̂ moved +20% along them; the interval includes it): run "
                           "more steps, or target_ess, to settle them")
    cells[2]["r_hat"] = 1.2
    assert cell_flags(cells[2]) == ["drifting", "unmixed"] and recommend(cells, 1.0)[0] == 2
    cells[2]["healthy_fraction"] = 0.75  # a diverged chain: not usable; s = 0.05 and 0.2 tie in log: the smaller
    assert cell_flags(cells[2]) == ["diverged", "drifting", "unmixed"] and recommend(cells, 1.0)[0] == 1


def test_rule_without_curvature_takes_the_smallest_usable_epsilon():
    cells = [dict(cell(e, 10.0 + e), step_scale=None) for e in (1, 2, 3)]
    cells[0]["healthy_fraction"] = 0.5
    best, reason, _ = recommend(cells, 1.0)
    assert best == 1 and "the smallest ε (least discretisation bias; κ unknown" in reason


def test_rule_flags_chains_that_left_the_basin():
    """Locality: the sampled loss halfway to the trivial predictor's is "nonlocal". It stays usable (how far the
    chains go is set by nβ, which calibration does not choose) and the reason says so."""
    cells = [cell(1.0, 50.0, locality=0.8), cell(0.5, 20.0, locality=0.1)]
    assert cell_flags(cells[0]) == ["nonlocal"] and cell_flags(cells[1]) == []
    best, reason, _ = recommend(cells, 1.0)
    assert best == 0 and reason.endswith("; its chains went 80% of the way from L_n(w*) to the trivial predictor's "
                                         "loss: at this nβ, λ̂ measures the temperature as much as the geometry at w*")


def test_rule_prefers_the_default_nbeta_then_the_smallest_gamma():
    cells = [cell(e, 10.0, nbeta=b, gamma=g) for g in (5.0, 1.0) for b in (0.5, 1.0, 2.0) for e in (0.5, 1.0)]
    best = recommend(cells, default_nbeta=1.0)[0]
    assert (cells[best]["nbeta"], cells[best]["gamma"], cells[best]["epsilon"]) == (1.0, 1.0, 1.0)
    cells = [cell(1.0, 10.0, healthy=0.5), cell(1.0, 20.0, nbeta=2.0)]
    assert recommend(cells, 1.0)[0] == 1  # the nearest row with a usable cell


def test_interval_adds_the_step_term_and_the_flat_gammas():
    """λ̂ ± Z90·√(se² + step² + drift² + γ²): step = the first-order error |λ̂(ε) − λ̂(ε')|·ε/|ε − ε'| from the
    next smaller ε' (twice the difference at half the step); drift = |drift_relative|·λ̂;
    γ = the spread over γ rows at the same step scale that agree within two combined se (the γ = 10 row here
    does not: it is left out)."""
    cells = [cell(0.5, 9.0, se=0.3), cell(1.0, 10.0, se=0.3),
             cell(0.5, 9.5, se=0.3, gamma=2.0), cell(1.0, 10.6, se=0.3, gamma=2.0),
             cell(1.0, 14.0, se=0.3, gamma=10.0)]
    best = recommend(cells, 1.0)[0]
    band = interval_of(cells, best)
    assert best == 1 and band.step_term == pytest.approx(2.0) and band.standard_error == 0.3
    assert band.gamma_term == pytest.approx(statistics.stdev([10.0, 10.6]))
    half = Z90 * math.sqrt(0.3**2 + 2.0**2 + band.gamma_term**2)  # no drift: drift_relative 0
    assert (band.low, band.high) == pytest.approx((10.0 - half, 10.0 + half))
    assert interval_of([cell(1.0, 10.0, se=0.3)], 0).step_term == 0.0  # a lone cell: the standard error alone
    drifting = interval_of([cell(1.0, 10.0, se=0.3, relative=0.08)], 0)  # λ̂ moved 8% along the chains
    assert drifting.drift_term == pytest.approx(0.8)
    assert drifting.high - 10.0 == pytest.approx(Z90 * math.hypot(0.3, 0.8))


def test_step_term_bounds_a_bias_growing_with_eps_and_a_deficit_shrinking_with_it():
    """λ̂(ε) = λ + b·ε (λ = 10, b = 2: the error at ε = 1 is 2) or λ̂(ε) = λ − c/ε (c = 2: the error is 2): the
    term is at least the true error in both cases, from the smaller neighbour or the larger, and equals it where
    the neighbour's reading is exact (half the step for the bias, twice for the deficit)."""
    bias, deficit = (lambda e: 10.0 + 2.0 * e), (lambda e: 10.0 - 2.0 / e)  # noqa: E731
    for shape in (bias, deficit):
        for other in (0.5, 2.0, 0.25, 4.0):
            assert first_order_error(cell(1.0, shape(1.0)), cell(other, shape(other))) >= 2.0 - 1e-12
    assert first_order_error(cell(1.0, bias(1.0)), cell(0.5, bias(0.5))) == pytest.approx(2.0)
    assert first_order_error(cell(1.0, deficit(1.0)), cell(2.0, deficit(2.0))) == pytest.approx(2.0)
    cells = [cell(1.0, bias(1.0)), cell(2.0, bias(2.0)), cell(0.5, math.nan, healthy=0.0)]
    assert interval_of(cells, 0).step_term == pytest.approx(4.0)  # the smaller cell diverged: 2·|Δ| from the larger
    with pytest.raises(FastLLCError, match="two different step sizes"):
        first_order_error(cell(1.0, 3.0), cell(1.0, 4.0))


def test_rule_without_usable_cells_gives_a_hint():
    best, _, hint = recommend([cell(1, math.nan, healthy=0.0), cell(2, math.nan, healthy=0.0)], 1.0)
    assert best is None and hint.startswith("every cell diverged") and "below 1" in hint
    best, _, hint = recommend([cell(1, 3.0, healthy=0.5), cell(2, 4.0, healthy=0.75)], 1.0)  # diverging chains
    assert best is None and hint.startswith("every cell had diverging chains") and "below 1" in hint


def test_rule_reads_the_studys_older_records():
    """Job records written before fastllc.calibration have tenths of the trace instead of ``drift``, and no
    step scale or locality."""
    old = dict(epsilon=1e-3, nbeta=1.0, gamma=5.0, llc_mean=100.0, llc_se=1.0, healthy_fraction=1.0, r_hat=1.01,
               mean_loss=0.1, first_tenth_mean_loss=0.1, last_tenth_mean_loss=0.1)
    assert cell_flags(old) == []
    assert cell_flags(dict(old, last_tenth_mean_loss=0.2)) == ["drifting"]
    assert recommend([old, dict(old, epsilon=2e-3)], 1.0)[0] == 0  # no κ: the smallest ε


def in_empty_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("grid,message", [
    (dict(epsilons=[1e-3, -1e-3]), "calibration grid: epsilons has -0.001; every value must be finite and > 0"),
    (dict(epsilons=[0.0]), "calibration grid: epsilons has 0; every value must be finite and > 0"),
    (dict(epsilons=[1e-3, math.nan]), "calibration grid: epsilons has nan; every value must be finite and > 0"),
    (dict(epsilons=[1e-3], nbetas=[math.inf]), "calibration grid: nbetas has inf; every value must be finite and > 0"),
    (dict(epsilons=[1e-3], gammas=[-1.0]), "calibration grid: gammas has -1; every value must be finite and >= 0"),
    (dict(epsilons=[]), "calibration grid: epsilons is empty; give at least one value"),
    (dict(epsilons=[1e-3, 1e-3]), "calibration grid: epsilons lists 0.001 twice; give each value once"),
    (dict(epsilons=["x"]), "calibration grid: epsilons must be a list of numbers, got ['x']"),
    (dict(epsilons=[1e-3], chains=0), "calibration needs at least one chain per cell, got chains = 0"),
    (dict(step_scales=[0.1, 0.0]), "calibration grid: step_scales has 0; every value must be finite and > 0"),
    (dict(steps="50"), "steps must be a whole number, got '50'"),
    (dict(chains=2.5), "chains must be a whole number, got 2.5"),
])
def test_bad_grids_are_refused_in_one_line(grid, message, tmp_path, monkeypatch):
    in_empty_dir(tmp_path, monkeypatch)
    model, data = linear_regression()
    with pytest.raises(FastLLCError) as error:
        calibrate(model, data, half_squared_error, **grid)
    assert str(error.value) == message
    assert os.listdir(tmp_path) == []


def test_a_grid_that_diverges_everywhere_is_a_result_with_a_hint(tmp_path, monkeypatch):
    in_empty_dir(tmp_path, monkeypatch)
    model, data = linear_regression()
    with pytest.warns(RuntimeWarning, match="calibration: every cell diverged"):
        result = calibrate(model, data, half_squared_error, epsilons=[10.0, 100.0], nbetas=[NBETA], gammas=[1.0],
                           chains=2, steps=20, batch_size=100, backend="generic")
    assert isinstance(result, CalibrationResult) and result.recommended is None
    assert all(c.flags == ["diverged"] for c in result.cells)
    assert result.hint == ("every cell diverged (no chain stayed finite and below the loss bound): try smaller "
                           "epsilons, below 10")
    assert result.table().splitlines()[-1] == f"no recommendation: {result.hint}"
    with pytest.raises(FastLLCError, match="^no calibration cell is recommended: every cell diverged"):
        result.settings()
    assert os.listdir(tmp_path) == []


def test_figure_of_a_calibration(dln_calibration, tmp_path):
    path = plot_calibration(dln_calibration, tmp_path / "calibration.png", title="(3,3,3) rank 1")
    assert path.stat().st_size > 20_000 and path.read_bytes()[:4] == b"\x89PNG"
    assert os.listdir(tmp_path) == ["calibration.png"]


@pytest.fixture
def cli(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTLLC_HOME", str(tmp_path / "home"))
    group = click.Group("fastllc", commands=[calibrate_command])
    return lambda *args: CliRunner().invoke(group, ["calibrate", *map(str, args)])


def assert_one_line_error(result, message):
    assert result.exit_code == 1 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], result.output


def test_cli_prints_the_table_and_the_recommendation(cli, tiny_run, tmp_path):
    plot = tmp_path / "out" / "grid.png"
    result = cli("--run", tiny_run.path, "--epsilons", "1e-4,1e-3", "--nbetas", "10,20", "--gammas", "5",
                 "--chains", 2, "--steps", 40, "--backend", "reference", "--plot", plot)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"run       {tiny_run.path}  checkpoint 3") and "n/log n = " in lines[0]
    assert sum(line.startswith(("★", " ")) and " 5 " in line for line in lines) == 4  # four cells
    assert any(line.startswith("recommended: ε = ") for line in lines) and plot.stat().st_size > 0
    record = json.loads(cli("--run", tiny_run.path, "--epsilons", "1e-4", "--nbetas", "10", "--chains", 2, "--steps",
                            40, "--checkpoint", 1, "--json").stdout)
    assert record["checkpoint"] == 1 and len(record["cells"]) == 1 and record["cells"][0]["nbeta"] == 10


def test_cli_default_grid_is_scaled_by_the_curvature(cli, tiny_run):
    result = cli("--run", tiny_run.path, "--chains", 2, "--steps", 40, "--backend", "reference", "--json")
    assert result.exit_code in (0, 1), result.output  # 40 steps may leave every cell drifting: then exit 1
    record = json.loads(result.stdout)
    scales = [c["step_scale"] for c in record["cells"]]  # 0.05, 0.1, or backed off by 4 or 16 (tiny run: nonlocal)
    assert record["kappa"] > 0 and any(scales == pytest.approx([0.05 / 4**k, 0.1 / 4**k]) for k in range(3))
    assert record["trivial_loss"] == pytest.approx(math.log(tiny_run.config.p), rel=1e-4)  # uniform prediction
    if record["recommended"] is not None:
        assert record["interval"]["low"] < record["cells"][record["recommended"]]["llc_mean"] < record["interval"]["high"]


def test_cli_exits_non_zero_after_the_table_when_every_cell_diverges(cli, tiny_run):
    result = cli("--run", tiny_run.path, "--epsilons", "1e3,1e4", "--nbetas", "10", "--chains", 2, "--steps", 20)
    assert_one_line_error(result, "Error: every cell diverged (no chain stayed finite and below the loss bound): "
                                  "try smaller epsilons, below 1000")
    assert "no recommendation: every cell diverged" in result.output  # the table came first
    assert result.output.index("diverged\n") < result.output.index("Error:")


@pytest.mark.parametrize("args,message", [
    (["--epsilons", "1e-4,abc"], "Error: --epsilons '1e-4,abc': give comma-separated numbers, like 1e-4,3e-4"),
    (["--step-scales", "0.1,0"], "Error: calibration grid: --step-scales has 0; every value must be finite and > 0"),
    (["--epsilons", "1e-4,-1"], "Error: calibration grid: --epsilons has -1; every value must be finite and > 0"),
    (["--nbetas", "0"], "Error: calibration grid: --nbetas has 0; every value must be finite and > 0"),
    (["--gammas", "nan"], "Error: calibration grid: --gammas has nan; every value must be finite and >= 0"),
    (["--chains", "0"], "Error: --chains must be at least 1 per cell, got 0"),
    (["--plot", "grid.xyz"], "Error: --plot grid.xyz: matplotlib cannot write .xyz"),
    (["--checkpoint", "9"], "does not exist;"),
])
def test_cli_bad_options_are_one_line_errors(cli, tiny_run, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    before = sorted(os.listdir(tmp_path))
    result = cli("--run", tiny_run.path, "--steps", 20, *args)
    assert_one_line_error(result, message)
    assert sorted(os.listdir(tmp_path)) == before


def test_cli_needs_an_existing_run(cli, tmp_path):
    assert_one_line_error(cli("--run", tmp_path / "nope"), f"Error: run directory {tmp_path / 'nope'} does not exist")


def test_chains_are_extended_until_converged_or_out_of_budget():
    """``target_ess``: rounds of twice the steps for the recommended cell and its half-step neighbour. A target
    the first run meets stops at once; one it cannot meet stops at the budget and says so; the rounds' cost
    (2 cells × 4 chains × 2·steps) is counted against max_chain_steps."""
    model, data = linear_regression()
    common = dict(gammas=[1.0], chains=4, steps=200, batch_size=500, backend="generic")
    easy = calibrate(model, data, half_squared_error, target_ess=5, max_chain_steps=250_000, **common)
    rounds = easy.extension["rounds"]  # split-R̂ ≤ 1.01 may take a few rounds (at s = 0.05: 1.016 after 3,200)
    assert easy.extension["status"].startswith("converged: split-R̂") and 1 <= len(rounds) <= 7
    assert [r["steps"] for r in rounds] == [200 * 2**k for k in range(len(rounds))]
    assert rounds[-1]["r_hat"] <= 1.01 and rounds[-1]["ess"] >= 5 and easy.steps == rounds[-1]["steps"]
    assert easy.extension["chain_steps"] == sum(2 * 4 * r["steps"] for r in rounds)
    hard = calibrate(model, data, half_squared_error, target_ess=1e9, max_chain_steps=2 * 4 * 200 + 2 * 4 * 400,
                     **common)
    assert [r["steps"] for r in hard.extension["rounds"]] == [200, 400] and hard.steps == 400
    assert hard.extension["status"].startswith("budget: split-R̂") and "over max_chain_steps = 4,800" in \
        hard.extension["status"]
    assert len(hard.cells) == 2 and hard.control_variate and hard.interval is not None
    with pytest.raises(FastLLCError, match="^target_ess must be greater than 0, got -1$"):
        calibrate(model, data, half_squared_error, target_ess=-1, **common)


def test_a_scaled_grid_that_diverges_everywhere_backs_off(monkeypatch):
    """κ understated 100× (as at a w* whose directions are all flat): s = 0.1 and 0.05 are really 10 and 5, past
    SGLD's stability limit of 4, and every chain diverges; the grid is rerun with s / 4 (really 2.5 and 1.25,
    stable), and the reason says so."""
    import fastllc.calibration as calibration

    model, data = linear_regression()
    x = data[0].double()
    exact = float(torch.linalg.eigvalsh(x.T @ x / len(x)).max())
    monkeypatch.setattr(calibration, "top_curvature", lambda *args, **kwargs: exact / 100)
    monkeypatch.setattr(calibration, "gradient_noise", lambda *args, **kwargs: 0.0)  # s from κ alone here
    with pytest.warns(RuntimeWarning, match="every cell diverged"):
        result = calibrate(model, data, half_squared_error, gammas=[1.0], chains=2, steps=300, batch_size=500,
                           backend="generic")
    assert result.recommended is not None and not any("diverged" in c.flags for c in result.cells)
    assert [c.epsilon * c.nbeta * exact for c in result.cells] == pytest.approx([1.25, 2.5], rel=1e-6)
    assert result.coarse_burn_in is None  # at 10× these steps the burn-in would be past the stability limit
    assert "every cell diverged or left the basin at 1 larger grid(s), so the step scales were divided by 4" in \
        result.reason


def test_a_w_star_without_curvature_takes_the_curvature_nearby():
    """K(w) = ½(w₁⁴ + w₂⁴) at w* = 0 (``theory.problems.Monomials``): the Hessian there is zero, so κ comes from
    points at the tempered posterior's quartic scale nβ^(−¼) around w* (``curvature.nearby_curvature``), where
    it is 6·w² ≈ 6/√nβ per direction (≈ 0.1 at nβ ≈ 2,000; within a factor of a few: four random points)."""
    from fastllc.theory.problems import Monomials

    gen = torch.Generator().manual_seed(0)
    n = 20_000
    x = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    x = x @ torch.linalg.inv(torch.linalg.cholesky(x.T @ x / n)).T
    noise = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    noise -= x @ torch.linalg.solve(x.T @ x, x.T @ noise)
    model, data = Monomials([[2], [2]]), (x.float(), noise.float())
    result = calibrate(model, data, half_squared_error, gammas=[1.0], chains=2, steps=400, batch_size=500,
                       backend="generic")
    nbeta = n / math.log(n)
    assert 6 / math.sqrt(nbeta) / 5 < result.kappa < 6 / math.sqrt(nbeta) * 10
    assert result.recommended is not None and result.cells[0].healthy_fraction == 1


def test_rmsprop_sgld_is_scaled_by_its_preconditioned_curvature():
    """RMSProp-SGLD steps by ε·P, P = 1/(√V + δ) ≈ 1/δ = 10 at a w* whose minibatch gradients are small: its κ is
    that of P^½ H P^½, several times SGLD's, so the same step scale gives a several times smaller ε."""
    model, data = linear_regression()
    common = dict(gammas=[1.0], chains=2, steps=300, batch_size=500, backend="generic")
    plain = calibrate(model, data, half_squared_error, **common)
    rms = calibrate(model, data, half_squared_error, sampler="rmsprop_sgld", **common)
    assert 3 < rms.kappa / plain.kappa < 11  # P between 1/(√V + δ) with √V ≲ 0.2 and 1/δ = 10
    assert rms.cells[1].epsilon < plain.cells[1].epsilon / 3
    # λ = d/2 = 3; 2 chains × 225 draws read with the control variate have se ≈ 10%: 35% is 3 se plus the
    # step scale's few percent of bias
    assert rms.recommended is not None and rms.recommended_cell.llc_mean == pytest.approx(3.0, rel=0.35)
