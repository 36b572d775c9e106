"""Chain-steps per second of devinterp 1.3.2's own sampler on the published workload (p=53, e=8, h=32, m=64): the
peer row of the benchmark table (``pytest bench --benchmark-only``), after checking that its λ̂ agrees with the
native backend's on the same settings. Skipped where devinterp is not installed.

devinterp runs its chains one after another (``cores=1``), so a few chains give its rate; its λ̂ is compared
with native's within a few standard errors (the two draw different minibatches and noise: they agree in
distribution, not draw for draw)."""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F

from fastllc import SGLDConfig, estimate_llc
from fastllc.backends import native
from fastllc.sampling import wbic_nbeta

from conftest import PUBLISHED, record

pytestmark = pytest.mark.benchmark(min_rounds=1)

CHAINS, DRAWS = 8, 100
EPSILON, GAMMA = 1e-3, 5.0


def devinterp_llc(model, x, y, seed: int) -> tuple[dict, float]:
    """devinterp's summary of CHAINS × DRAWS SGLD steps from ``model`` (ε, γ, nβ as in ``fastllc_llc``) and the
    seconds it took."""
    sampler = pytest.importorskip("devinterp.slt.sampler")
    from devinterp.optim.sgld import SGLD
    from torch.utils.data import DataLoader, RandomSampler, TensorDataset

    dataset = TensorDataset(x, y)
    loader = DataLoader(dataset, batch_size=PUBLISHED.batch_size,
                        sampler=RandomSampler(dataset, replacement=True, num_samples=10**7))

    def evaluate(net, batch):
        inputs, targets = batch
        return F.cross_entropy(net(inputs), targets), {}

    torch.manual_seed(seed)
    start = time.perf_counter()
    summary = sampler.estimate_learning_coeff_with_summary(
        model, loader, evaluate=evaluate, sampling_method=SGLD,
        optimizer_kwargs=dict(lr=EPSILON, localization=GAMMA, nbeta=wbic_nbeta(len(y))), num_chains=CHAINS,
        num_draws=DRAWS, num_burnin_steps=0, init_loss=F.cross_entropy(model(x), y).item(), seed=seed,
        device="cpu", verbose=False)
    return summary, time.perf_counter() - start


def fastllc_llc(model, x, y, chains: int, seed: int):
    """fastllc's λ̂ (native backend) with devinterp's update and draws: Δw = −(ε/2)(γ(w − w*) + nβ∇L_m) + N(0, ε),
    the loss recorded at w_t before each step, no burn-in."""
    config = SGLDConfig(chains=chains, steps=DRAWS, epsilon=EPSILON, gamma=GAMMA, nbeta=wbic_nbeta(len(y)),
                        batch_size=PUBLISHED.batch_size, seed=seed)
    return estimate_llc(native.sample(model, x, y, F.cross_entropy, config), config)


def standard_error(per_chain: list[float]) -> float:
    mean = sum(per_chain) / len(per_chain)
    return math.sqrt(sum((v - mean) ** 2 for v in per_chain) / (len(per_chain) - 1) / len(per_chain))


def test_devinterp_peer_is_timed_and_agrees_with_native(benchmark, published):
    pytest.importorskip("devinterp.slt.sampler")
    reason = native.unavailable_reason()
    if reason is not None:
        pytest.skip(f"the native kernel does not build here (the agreement check needs it): {reason}")
    model, (x, y) = published
    runs = []

    def run():  # one round: devinterp runs ~30–50 chain-steps per second on the 2-core development machine
        runs.append(devinterp_llc(model, x, y, seed=1))

    benchmark.pedantic(run, rounds=1, iterations=1)
    theirs = runs[0][0]
    ours = fastllc_llc(model, x, y, chains=64, seed=1)
    their_llc = float(theirs["llc/mean"])
    their_se = standard_error([float(theirs[f"llc-chain/{i}"]) for i in range(CHAINS)])
    # independent estimates of one quantity: their difference has standard deviation √(se₁² + se₂²); within 3 of
    # them (the seeds are fixed, so the check is deterministic). Measured: devinterp 59.1 ± 2.05, native 61.7 ±
    # 0.66. Native with ε doubled gives 76.6, without localisation (γ = 0) 73.1: both beyond 3 standard errors.
    assert abs(their_llc - ours.llc_mean) <= 3 * math.hypot(their_se, ours.llc_se), (their_llc, their_se,
                                                                                   ours.llc_mean, ours.llc_se)
    record(benchmark, "devinterp-1.3.2", PUBLISHED, CHAINS, DRAWS, [runs[0][1]], llc=round(their_llc, 2),
           llc_se=round(their_se, 2), native_llc=round(ours.llc_mean, 2), native_llc_se=round(ours.llc_se, 2))
