"""The reference estimator on a trained network reproduces the published λ̂ at p = 23."""

import math

import pytest

from fastllc import SGLDConfig, estimate_run

PUBLISHED = {23: 112.8}  # docs/reference/seed_results.json, psweep e8_h32, mean over 5 runs (sd 1.9)
# Our own five p = 23 networks (docs/results.md, psweep; 64 chains × 5000 steps each): λ̂ 119.1 ± 3.6 over
# seeds, 5.6% above the published mean; the largest per-chain sd among them is 1.9.
OURS, SEED_SD, CHAIN_SD = 119.1, 3.6, 1.9


@pytest.mark.slow
def test_p23_matches_the_published_llc(trained_p23):
    # Published training (10,000 batches, e=8, h=32) and SGLD (ε=1e-3, γ=5, m=64, nβ=n/log n, 5000 steps);
    # 2 chains instead of the study's 64, to keep CI at ~30 s.
    run = trained_p23
    assert run.metrics[-1]["test_acc"] > 0.99  # it generalises, as the published networks do
    result = estimate_run(run, config=SGLDConfig(chains=2, steps=5000, orthogonal=True), backend="reference")
    assert result.healthy_chains == 2
    # Tolerance. This network is one draw from the seed-to-seed distribution of our networks (a torch or
    # platform change that alters training draws another), estimated with 2 chains: its λ̂ scatters about our
    # 5-seed mean with sd √(3.6² + 1.9²/2) = 3.84 (the seed spread, ours rather than the published 1.9, which
    # is smaller, and the 2-chain standard error). 4 sd, a false alarm < 1e-4 if Gaussian (the 3.6 is itself
    # an estimate from 5 seeds), gives 119.1 ± 15.4 = [103.7, 134.5]: the published 112.8 lies inside
    # (−8%, +19% of it), while an estimator off by ±15% or more fails. Measured here: 118.4.
    spread = math.hypot(SEED_SD, CHAIN_SD / math.sqrt(2))
    assert abs(result.llc_mean - OURS) < 4 * spread
    # and should OURS ever be re-measured, the band must still contain the published value
    assert OURS - 4 * spread < PUBLISHED[23] < OURS + 4 * spread


def test_the_targets_judge_the_reports_numbers():
    """``experiments.targets``: the study's targets and tolerances as verdicts on numbers (the report renders them)."""
    from fastllc.experiments import targets

    rows = [dict(p=23, mean=115.0, published=112.8), dict(p=29, mean=150.0, published=None),
            dict(p=53, mean=390.0, published=371.1)]
    verdict = targets.psweep_verdict(rows, slope=8.7, r2_all=0.99)
    assert (verdict["worst_p"], verdict["means_met"], verdict["slope_met"], verdict["r2_met"]) == (53, False, True, True)
    assert verdict["worst"] == pytest.approx(390.0 / 371.1 - 1)  # +5.1%: beyond the 5% target
    assert targets.psweep_verdict(rows[1:2], slope=8.6, r2_all=1.0) is None  # nothing published to compare
    networks = {(8, 32): [dict(p=23, mean=109.0, published=100.0), dict(p=29, mean=1.0, published=1.0),
                          dict(p=37, mean=180.0, published=190.0)],
                (16, 32): [dict(p=23, mean=1.0, published=100.0)]}  # not the target network: not judged
    verdict = targets.architectures_verdict(networks)
    assert [p for p, _ in verdict["differences"]] == [23, 37] and verdict["met"]
    memo = {10: dict(mean=78.0, published=80.0), 15: dict(mean=150.0, published=180.0), 30: dict(mean=1.0, published=1.0)}
    verdict = targets.memorization_verdict(memo, a=0.9)
    assert [p for p, _ in verdict["differences"]] == [10, 15] and not verdict["means_met"] and verdict["a_met"]
    assert targets.memorization_verdict(memo, a=math.nan) is None
    assert targets.generalised({"final_metrics": {"test_acc": 0.99}}) and not targets.generalised({})
    assert targets.memorised({"final_metrics": {"train_acc": 1.0}}) and not targets.memorised({"final_metrics": {"train_acc": 0.9}})
    assert [p for p in range(5, 35, 5) if targets.in_claim_range(p)] == [10, 15, 20, 25]
