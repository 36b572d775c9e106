"""Deep linear networks: Aoyagi's exact learning coefficient, the rank-r teacher and its data, and λ̂ on one."""

import itertools
import math
import os
from fractions import Fraction

import pytest
import torch

from fastllc import FastLLCError, estimate
from fastllc.theory.dln import (CalibratedSettings, DLNConfig, benchmark_table,
                                dln_data, dln_learning_coefficient, dln_teacher, format_comparison, format_table,
                                half_squared_error, reduced_rank_regression_llc)

SMALL = range(1, 7)


def test_two_layer_networks_are_reduced_rank_regression():
    """Widths (M, H, N): the DLN formula and Aoyagi & Watanabe (2005) agree exactly on every case, all four
    of the 2005 theorem's branches included (216 architectures, every rank up to the narrowest width)."""
    branches = set()
    for M, H, N in itertools.product(SMALL, SMALL, SMALL):
        for r in range(min(M, H, N) + 1):
            assert dln_learning_coefficient((M, H, N), r) == reduced_rank_regression_llc(M, N, H, r), (M, H, N, r)
            branches.add((N + r <= M + H and M + r <= N + H and H + r <= M + N, M + H < N + r, N + H < M + r))
    assert len(branches) == 4


def test_one_layer_networks_are_regular():
    """A single linear map is a regular model: λ = d/2 = H_0·H_1/2 at every rank, full rank included."""
    for h_in, h_out in itertools.product(range(1, 11), repeat=2):
        for r in range(min(h_in, h_out) + 1):
            assert dln_learning_coefficient((h_in, h_out), r) == h_in * h_out / 2


def test_hand_checked_values():
    # (5,5,5,5), r = 0: M_j = 5 for all four, S = all (20 ≥ 3·5), l = 3, M̄ = ⌈20/3⌉ = 7, a = 20 − 6·3 = 2:
    # λ = 0 + 2·1/12 − (3·2/4)·(20/3)² + ½·6·25 = 1/6 − 200/3 + 75 = 8.5.
    assert dln_learning_coefficient((5, 5, 5, 5), 0) == 8.5
    # (3,20,20,3), r = 1: M = (2,19,19,2); S = the two 2's (4 < 1·19), l = 1, a = 1: λ = (−1 + 6)/2 + ½·4 = 4.5,
    # the d/2 of one 3×3 map: wide hidden layers add nothing.
    assert dln_learning_coefficient((3, 20, 20, 3), 1) == 4.5
    # Reduced-rank regression's published (M, N, H) = (3, 3, 2), r = 0 value (tests/test_known_answers.py).
    assert dln_learning_coefficient((3, 2, 3), 0) == 2.5


def brute_force(widths, r):
    """Aoyagi's λ from every index set S that satisfies the theorem's three conditions (not only prefixes)."""
    ms = [h - r for h in widths]
    values = set()
    for size in range(2, len(ms) + 1):
        for chosen in itertools.combinations(range(len(ms)), size):
            subset = [ms[j] for j in chosen]
            rest = [ms[j] for j in range(len(ms)) if j not in chosen]
            ell, total = size - 1, sum(subset)
            if rest and not (max(subset) < min(rest) and total < ell * min(rest)):
                continue
            if total < ell * max(subset):
                continue
            a = total - (math.ceil(Fraction(total, ell)) - 1) * ell
            pairs = sum(x * y for x, y in itertools.combinations(subset, 2))
            values.add(Fraction(-r * r + r * (widths[0] + widths[-1]), 2) + Fraction(a * (ell - a), 4 * ell)
                       - Fraction(ell * (ell - 1), 4) * Fraction(total, ell) ** 2 + Fraction(pairs, 2))
    return values


def test_every_admissible_index_set_gives_the_same_value():
    """The theorem asserts some S exists; the function searches sorted prefixes only. Over all 3–5-layer width
    lists from {1, 2, 3, 5, 8}, some S always exists, all admissible S agree, and the function returns that."""
    checked = 0
    for layers in (3, 4, 5):
        for widths in itertools.product((1, 2, 3, 5, 8), repeat=layers + 1):
            if len(set(widths)) > 3 and layers == 5:  # keep the loop to a second: mixed lists of 6 are many
                continue
            for r in {0, min(widths) // 2, min(widths)}:
                values = brute_force(widths, r)
                assert len(values) == 1, (widths, r, values)
                assert dln_learning_coefficient(widths, r) == float(values.pop())
                checked += 1
    assert checked > 1000


def test_invariances_and_bounds():
    """λ depends on the M_j as a multiset plus H_0 + H_L: permuting hidden widths or reversing the network
    (transposing the map) leaves it unchanged. It never exceeds d/2; with every hidden width far above the
    ends it is the d/2 of the end-to-end map alone, H_0·H_L/2."""
    for widths in [(3, 5, 7, 4), (10, 4, 8, 6, 9), (2, 9, 3, 3, 5, 4)]:
        for r in range(min(widths) + 1):
            value = dln_learning_coefficient(widths, r)
            for hidden in itertools.permutations(widths[1:-1]):
                assert dln_learning_coefficient((widths[0], *hidden, widths[-1]), r) == value
            assert dln_learning_coefficient(widths[::-1], r) == value
            assert value <= sum(a * b for a, b in zip(widths, widths[1:])) / 2
    assert dln_learning_coefficient((4, 50, 50, 50, 3), 2) == 4 * 3 / 2


@pytest.mark.parametrize("widths,rank,message", [
    ((5,), 0, "DLN widths must be two or more positive integers (input, hidden..., output), got [5]"),
    ((3, 0, 2), 0, "DLN widths must be two or more positive integers (input, hidden..., output), got [3, 0, 2]"),
    ((3, 2.5, 2), 0, "got [3, 2.5, 2]"),
    ((3, 2, 4), 3, "DLN rank must be an integer in [0, min(widths)] = [0, 2] (no product of these layers has a "
                   "higher rank), got 3"),
    ((3, 2, 4), -1, "= [0, 2] (no product of these layers has a higher rank), got -1"),
])
def test_bad_architectures_are_refused_in_one_line(widths, rank, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for function in (dln_learning_coefficient, dln_teacher):
        with pytest.raises(FastLLCError) as error:
            function(widths, rank)
        assert message in str(error.value) and "\n" not in str(error.value)
    assert os.listdir(tmp_path) == []


def test_too_few_examples_are_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FastLLCError, match=r"^dln_data needs more examples than inputs \(4\): whitening needs "
                                           r"xᵀx invertible; got n = 4$"):
        dln_data(dln_teacher((4, 3, 2), 1), 4)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("widths,rank", [((3, 3, 3), 1), ((4, 6, 2, 5), 2), ((5, 7, 3, 8, 4, 6), 3), ((3, 4), 3),
                                         ((6, 5, 4), 0)])
def test_teacher_has_the_chosen_rank_in_every_layer(widths, rank):
    teacher = dln_teacher(widths, rank, seed=3)
    assert [(layer.in_features, layer.out_features) for layer in teacher] == list(zip(widths, widths[1:]))
    assert all(layer.bias is None for layer in teacher)
    product = torch.eye(widths[0], dtype=torch.float64)
    for layer in teacher:  # float32 weights: the zero singular values are rounding, ~1e-8; the others are 1
        assert torch.linalg.matrix_rank(layer.weight.double(), atol=1e-5) == rank
        product = layer.weight.double() @ product
    assert torch.linalg.matrix_rank(product, atol=1e-5) == rank
    singular = torch.linalg.svdvals(product)
    torch.testing.assert_close(singular[:rank], torch.ones(rank, dtype=torch.float64), atol=1e-5, rtol=0)
    again = dln_teacher(widths, rank, seed=3)
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(teacher, again))


def test_data_make_the_teacher_the_exact_minimum():
    """L_n(w) − L_n(w*) = ½‖W − W*‖²_F for any w, and ∇L_n(w*) = 0 (float32 data: to ~1e-6)."""
    teacher = dln_teacher((4, 5, 3), 2, seed=1)
    x, y = dln_data(teacher, 500, seed=2)
    assert x.shape == (500, 4) and y.shape == (500, 3)
    torch.testing.assert_close(x.T @ x / 500, torch.eye(4), atol=1e-5, rtol=0)
    residual = y - teacher(x)
    assert residual.pow(2).mean().item() == pytest.approx(1.0, abs=0.15)  # unit noise: 1500 draws, sd of mean 0.04
    loss_star = half_squared_error(teacher(x), y)
    loss_star.backward()
    assert max(layer.weight.grad.abs().max().item() for layer in teacher) < 1e-5
    other = dln_teacher((4, 5, 3), 3, seed=9)
    with torch.no_grad():
        gap = half_squared_error(other(x), y) - loss_star
        difference = other[1].weight @ other[0].weight - teacher[1].weight @ teacher[0].weight
    assert gap.item() == pytest.approx(0.5 * difference.pow(2).sum().item(), rel=1e-4)


def test_llc_estimate_of_a_small_dln_is_near_aoyagis_value():
    """(3,3,3) with a rank-1 teacher: λ = 4 (d/2 would be 9).

    Settings: n = 2000, nβ = n/log n ≈ 263, ε·nβ = 0.03 (ε·nβ·κ ≈ 0.08 for the stiffest direction,
    κ ≈ 2·1.3 for two unit layers and minibatch curvature: discretisation bias ≈ 2%), γ = 1 (g = γ/√nβ ≈ 0.06:
    the reduced-rank test's g = 0.05 costs 4.7% of the singular part, here ~0.1 of λ). Statistical error: the
    minibatch loss records carry the unit noise (sd ≈ nβ·√(3/2/500) per record); measured se ≈ 0.16 over four
    seeds (λ̂ = 3.99, 3.61, 3.98, 3.81). Tolerance 0.6 = 15% of λ ≈ 3 se + the localisation bias.
    """
    teacher = dln_teacher((3, 3, 3), 1, seed=0)
    n = 2000
    x, y = dln_data(teacher, n, seed=0)
    nbeta = n / math.log(n)
    result = estimate(teacher, (x, y), half_squared_error, chains=8, steps=2000, burn_in=400, epsilon=0.03 / nbeta,
                      gamma=1.0, batch_size=500, backend="generic", seed=0)
    assert result.healthy_chains == 8
    assert result.llc_se < 0.3
    assert result.llc_mean == pytest.approx(dln_learning_coefficient((3, 3, 3), 1), abs=0.6)


def test_benchmark_table_rows_and_text():
    """Plumbing of the table (tiny run: the numbers are checked by the test above and the benchmark)."""
    configs = [DLNConfig((2, 2), 1), DLNConfig((2, 3, 2), 1)]
    seen = []
    rows = benchmark_table(configs, lambda c: dict(chains=2, steps=30, epsilon=1e-4, batch_size=50), n=200,
                           progress=seen.append)
    assert seen == rows and [r["config"] for r in rows] == ["2-2 r1", "2-3-2 r1"]
    assert [r["params"] for r in rows] == [4, 12] and [r["llc"] for r in rows] == [2.0, 2.0]
    assert all(math.isfinite(r["llc_hat"]) and r["healthy"] == "2/2" for r in rows)
    lines = format_table(rows)
    assert len(lines) == 4 and lines[-1].startswith("median |λ̂ − λ|/λ = ")


def test_benchmark_table_checks_every_architecture_before_sampling(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    seen = []
    with pytest.raises(FastLLCError, match=r"^DLN rank must be an integer in \[0, min\(widths\)\] = \[0, 2\]"):
        benchmark_table([DLNConfig((2, 2), 1), DLNConfig((2, 3), 5)], dict(chains=2, steps=30), n=200,
                        progress=seen.append)
    assert seen == [] and os.listdir(tmp_path) == []


def test_calibrated_settings_feed_the_table():
    """Plumbing of the calibrated column (tiny runs; the numbers are the benchmark's): each network is
    calibrated on its own teacher and data, and the table's estimate runs at the recommended cell."""
    configs = [DLNConfig((2, 3, 2), 1)]
    settings = CalibratedSettings(200, base=dict(chains=2, steps=40, batch_size=50), chains=2, steps=60, burn_in=10,
                                  batch_size=50)
    rows = benchmark_table(configs, settings, n=200)
    calibration = settings.calibrations["2-3-2 r1"]
    assert [c.step_scale for c in calibration.cells] == pytest.approx([0.05, 0.1]) and calibration.chains == 2
    chosen = calibration.recommended_cell
    assert rows[0]["epsilon"] == pytest.approx(chosen.epsilon) and rows[0]["nbeta"] == pytest.approx(200 / math.log(200))
    assert rows[0]["healthy"] == "2/2" and rows[0]["gamma"] == 1.0
    hand = benchmark_table(configs, dict(chains=2, steps=40, epsilon=1e-4, batch_size=50), n=200)
    lines = format_comparison(hand, rows)
    assert len(lines) == 4 and lines[0].split()[:3] == ["config", "params", "λ"]
    assert lines[2].startswith("hand: median |λ̂ − λ|/λ = ") and lines[3].startswith("calibrated: median")
