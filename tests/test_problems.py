"""The random exact-answer problems (``fastllc.theory.problems``) and calibration judged on fresh draws of them.

Each family is checked against its definition: w* is the exact minimum of L_n, L_n(w) − L_n(w*) is the stated
K(w), and the stated λ agrees with the formula it specialises. The calibration test draws NEW problems every run
from a seed it prints (``FASTLLC_TEST_SEED`` replays one): no rule can be fitted to a fixed list.
"""

import os
import statistics

import pytest
import torch

from fastllc import calibrate
from fastllc.theory.dln import dln_learning_coefficient, reduced_rank_regression_llc
from fastllc.theory.dln import dln_data, dln_teacher, half_squared_error
from fastllc.theory.problems import (FAMILIES, Monomials, Problem, draw_dln, draw_problems, monomial_llc,
                                     posterior_llc)


def loss_and_gradient(problem, weights=None):
    model = problem.model
    if weights is not None:
        with torch.no_grad():
            for p, w in zip(model.parameters(), weights):
                p.copy_(w)
    x, y = problem.data
    model.zero_grad()
    loss = problem.loss_fn(model(x), y)
    loss.backward()
    return float(loss.detach()), torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def test_draws_are_reproducible_and_fresh():
    a = draw_problems(7, 4, FAMILIES, n=500)
    b = draw_problems(7, 4, FAMILIES, n=500)
    c = draw_problems(8, 4, FAMILIES, n=500)
    assert [p.name for p in a] == [p.name for p in b] and [p.family for p in a] == list(FAMILIES)
    assert all(torch.equal(p.data[1], q.data[1]) for p, q in zip(a, b))
    assert [p.name for p in a] != [p.name for p in c]
    with pytest.raises(ValueError, match="unknown problem families"):
        draw_problems(0, 1, ("mlp",))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("family", FAMILIES)
def test_w_star_is_the_exact_minimum_with_the_stated_potential(family, seed):
    """Gradient at w* below float32 rounding of the data (1e-4), and L_n(w) − L_n(w*) equal to K(w) to 1e-3
    relative (float32 sums of 2,000 terms of size ~1) at a random nearby w."""
    problem = draw_problems(seed, 4, FAMILIES, n=2000)[FAMILIES.index(family)]
    start = [p.detach().clone() for p in problem.model.parameters()]
    loss_star, gradient = loss_and_gradient(problem)
    assert gradient.abs().max() < 1e-4
    generator = torch.Generator().manual_seed(seed)
    moved = [w + 0.3 * torch.randn(w.shape, generator=generator) for w in start]
    loss_moved, _ = loss_and_gradient(problem, moved)
    if family == "monomial":
        w, k, exact = moved[0].double(), 0, 0.0
        for block in problem.info["blocks"]:
            exact += 0.5 * float(torch.prod(torch.stack([w[k + i] ** e for i, e in enumerate(block)]))) ** 2
            k += len(block)
    else:
        product = lambda ws: torch.linalg.multi_dot([w.double() for w in reversed(ws)]) if len(ws) > 1 else ws[0].double()
        exact = 0.5 * float((product(moved) - product(start)).pow(2).sum())
    assert loss_moved - loss_star == pytest.approx(exact, rel=1e-3, abs=1e-6)


def test_stated_coefficients_agree_with_the_formulas_they_specialise():
    for problem in draw_problems(3, 12, FAMILIES, n=200):
        info = problem.info
        if problem.family == "rrr":
            m, h, n = info["widths"]
            assert problem.llc == reduced_rank_regression_llc(m, n, h, info["rank"])
            assert problem.llc == pytest.approx(dln_learning_coefficient(info["widths"], info["rank"]))
        if problem.family == "regular":  # one layer: regular, d/2 (Aoyagi's formula says the same)
            assert problem.llc == problem.parameters / 2 == dln_learning_coefficient(info["widths"], min(info["widths"]))
        if problem.family == "dln":
            assert 2 <= len(info["widths"]) - 1 <= 6 and all(2 <= w <= 16 for w in info["widths"])
    assert monomial_llc([[1, 1]]) == 0.5 and monomial_llc([[2]]) == 0.25
    assert monomial_llc([[1, 2], [2, 2], [1]]) == 0.25 + 0.25 + 0.5
    assert Monomials([[1, 2]])(torch.ones(3, 1)).shape == (3, 1)


@pytest.mark.parametrize("seed", range(4))
def test_dln_teacher_sits_on_the_most_singular_stratum_of_its_minima(seed):
    """Every layer of rank exactly r with r unit singular values, balanced (W_{l+1}ᵀW_{l+1} = W_l W_lᵀ), the
    product of rank r. No true parameter has a layer of rank < r (the product would lose rank), so w* lies in the
    stratum every other true parameter has in its closure; the local learning coefficient there is the smallest
    over the minima, which is the global one Aoyagi's formula states (a point in the closure of others has a
    local λ ≤ theirs). The hypothesis that w* is more singular than the stated λ assumes is ruled out
    here; docs/calibration.md measures the same with ``posterior_llc``. Tolerance 1e-5: float32 weights."""
    problem = draw_problems(seed, 1)[0]
    r, layers = problem.info["rank"], [layer.weight.detach().double() for layer in problem.model]
    for layer in layers:
        values = torch.linalg.svdvals(layer)
        assert torch.allclose(values[:r], torch.ones(r, dtype=torch.float64), atol=1e-5)
        assert bool(torch.all(values[r:] < 1e-5))
    for lower, upper in zip(layers, layers[1:]):
        assert torch.allclose(upper.T @ upper, lower @ lower.T, atol=1e-5)
    product = torch.linalg.multi_dot(list(reversed(layers)))
    assert int(torch.linalg.matrix_rank(product, atol=1e-4)) == r


def _single(blocks, n=1000):
    """A monomial problem with the given blocks (data only sets n; ``posterior_llc`` never reads them)."""
    data = (torch.zeros(n, len(blocks)), torch.zeros(n, len(blocks)))
    return Problem("monomial", "test", Monomials(blocks), data, half_squared_error, monomial_llc(blocks),
                   dict(blocks=blocks))


def test_posterior_llc_is_exact_where_the_expectation_has_a_closed_form():
    """Three closed forms. Regular (K = ½‖W − W*‖², d = 24): nβ·E[K] = (d/2)·nβ/(nβ + γ), checked at γ = 1 and at
    γ = nβ (d/4: the localisation counted right). Single-weight monomials ½w² and ½w⁴ at γ = 0: nβ·E[K] = 1/(2k)
    exactly at any nβ (substitute w = nβ^(−1/2k)·u), so 1/2 + 1/4. MALA has no step bias, so the bounds are
    the chains' noise: 5 standard errors over 8 chains (se ≈ 0.3–1%), floored at 2% for se's own error."""
    regular = draw_problems(3, 1, ("regular",), n=20_000)[0]
    d = regular.parameters
    for nbeta, gamma, exact in ((2019.0, 1.0, d / 2 * 2019 / 2020), (2019.0, 2019.0, d / 4)):
        result = posterior_llc(regular, nbeta, gamma, steps=4000)
        assert result.llc == pytest.approx(exact, abs=max(5 * result.se, 0.02 * exact)), result
        assert 0.4 < result.acceptance < 0.75  # the step was tuned
    result = posterior_llc(_single([[1], [2]]), 500.0, 0.0, chains=16, steps=6000)
    assert result.llc == pytest.approx(0.75, abs=max(5 * result.se, 0.02 * 0.75)), result


def test_posterior_llc_of_a_singular_dln_is_near_its_lambda_at_the_studys_n():
    """A rank-1 three-layer DLN (4-5-6-3, λ = 6) at the study's nβ = 20,000/log 20,000 and γ = 1: the localised
    posterior's expectation is within 15% of λ (measured 5.59, 5.72, 5.76 on three MALA seeds; the deep seed-7
    networks 0.90–1.03·λ, docs/calibration.md), so a calibrated SGLD estimate far below λ there is the
    sampler's shortfall, not the finite n. The 15% holds the finite-nβ deficit (−4 to −7% here) and the noise of
    8 chains × 5,000 kept steps (se ≤ 0.14)."""
    teacher = dln_teacher((4, 5, 6, 3), 1, seed=0)
    problem = Problem("dln", "dln 4-5-6-3 r1", teacher, dln_data(teacher, 20_000, 0), half_squared_error,
                      dln_learning_coefficient([4, 5, 6, 3], 1), dict(widths=[4, 5, 6, 3], rank=1))
    result = posterior_llc(problem, steps=10_000)
    assert result.llc == pytest.approx(problem.llc, rel=0.15), result


@pytest.mark.slow
def test_calibration_on_fresh_deep_linear_networks():
    """Four small deep linear networks drawn fresh (2–3 layers, widths 2–8), calibrated with the defaults (step
    scales 0.1 and 0.05 × 4 chains × 3000 steps, γ = 1, minibatches of 500 of n = 20,000). Bounds with room
    for the noise of four draws: each 90% interval covers λ with probability ≈ 0.9 (measured 95% on 40 larger
    networks, docs/calibration.md), so fewer than 2 of 4 covered has probability < 0.01 for a correct
    interval; the median |relative error| measured there is 7–9%, and 4 chains × 2250 draws have se ≈ 5–15%
    on these λ, so a median above 35% means a broken rule, not bad luck."""
    seed = int(os.environ.get("FASTLLC_TEST_SEED", int.from_bytes(os.urandom(3), "little")))
    print(f"problems drawn with seed {seed} (FASTLLC_TEST_SEED={seed} replays them)")
    generator = torch.Generator().manual_seed(seed)
    problems = [draw_dln(int(torch.randint(0, 2**31 - 1, (), generator=generator)), 20_000, layers=(2, 3),
                         widths=(2, 8)) for _ in range(4)]
    errors, covered = [], 0
    for problem in problems:
        result = calibrate(problem.model, problem.data, problem.loss_fn, chains=4, steps=3000, gammas=[1.0],
                           batch_size=500, backend="generic", seed=seed)
        cell, band = result.recommended_cell, result.interval
        assert cell is not None, f"seed {seed}, {problem.name}: {result.hint}"
        errors.append(abs(cell.llc_mean - problem.llc) / problem.llc)
        covered += band.low <= problem.llc <= band.high
    summary = f"seed {seed}: errors {[f'{e:.0%}' for e in errors]}, {covered} of 4 covered"
    assert covered >= 2, summary
    assert statistics.median(errors) <= 0.35, summary
