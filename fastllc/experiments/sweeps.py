"""The published study's sweeps as lists of jobs (../shared/reference/seed_results.json)."""

from __future__ import annotations

from ..sampling import SGLDConfig
from ..train import TrainConfig, default_batches
from .jobs import Job

PUBLISHED_PSWEEP = {23: 112.8, 29: 157.7, 37: 222.3, 41: 259.4, 47: 312.1, 53: 371.1}  # mean over 5 runs
PUBLISHED_PSWEEP_SD = {23: 1.9, 29: 3.0, 37: 5.5, 41: 12.4, 47: 15.2, 53: 6.7}
PUBLISHED_ARCHITECTURES = {
    (8, 32): {23: 102, 29: 139, 37: 185, 41: 231, 47: 284},
    (16, 32): {23: 112, 29: 158, 37: 196, 41: 256, 47: 330},
    (16, 64): {23: 148, 29: 191, 37: 275, 41: 309, 47: 382},
}
PUBLISHED_MEMORIZATION = {5: 8, 10: 53, 15: 157, 20: 318, 25: 550}  # e=50, h=200, read from the plot


def study_sgld(chains: int, steps: int = 5000) -> SGLDConfig:
    """The study's SGLD: ε = 1e-3, γ = 5, m = 64, nβ = n/log n, no burn-in, orthogonal restriction on."""
    return SGLDConfig(chains=chains, steps=steps, epsilon=1e-3, gamma=5.0, batch_size=64, orthogonal=True)


def psweep(chains: int = 64, seeds: int = 5, quick: bool = False) -> list[Job]:
    primes = [17, 23, 29] if quick else sorted(PUBLISHED_PSWEEP)  # quick: the smallest p that generalise
    jobs = []
    for p in primes:
        for seed in range(seeds):
            training = TrainConfig(p=p, batches=default_batches(p), checkpoints=1 if quick else 25, seed=seed)
            jobs.append(Job("psweep", training, study_sgld(chains, 1000 if quick else 5000),
                            tags=dict(published=PUBLISHED_PSWEEP.get(p), published_sd=PUBLISHED_PSWEEP_SD.get(p))))
    return jobs


def architectures(chains: int = 64, seeds: int = 1, quick: bool = False) -> list[Job]:
    primes = [7, 11] if quick else [23, 29, 37, 41, 47]
    jobs = []
    for (embed, hidden), published in PUBLISHED_ARCHITECTURES.items():
        for p in primes:
            for seed in range(seeds):
                training = TrainConfig(p=p, embed=embed, hidden=hidden, batches=3000 if quick else default_batches(p),
                                       checkpoints=1 if quick else 25, seed=seed)
                jobs.append(Job("architectures", training, study_sgld(chains, 1000 if quick else 5000),
                                tags=dict(published=published.get(p))))
    return jobs


def memorization(chains: int = 64, seeds: int = 1, quick: bool = False) -> list[Job]:
    """Random commutative operation with a network big enough to memorise (the study's e=50, h=200),
    beside the generalising network of the p-sweep (modular addition, e=8, h=32) at the same p."""
    primes = [11, 17] if quick else [5, 10, 15, 20, 25, 30, 35, 40]
    jobs = []
    for p in primes:
        for seed in range(seeds):
            memorising = TrainConfig(p=p, task="random", embed=50, hidden=200, batches=4000 if quick else 10_000,
                                     checkpoints=1 if quick else 25, seed=seed)
            generalising = TrainConfig(p=p, batches=default_batches(p), checkpoints=1 if quick else 25, seed=seed)
            sgld = study_sgld(chains, 1000 if quick else 5000)
            jobs.append(Job("memorization", memorising, sgld, tags=dict(published=PUBLISHED_MEMORIZATION.get(p))))
            jobs.append(Job("memorization", generalising, sgld, tags=dict(published=None)))
    return jobs


def dynamics(chains: int = 16, seeds: int = 2, quick: bool = False) -> list[Job]:
    """p = 53, 1500 batches, 25 checkpoints (one every 60 batches), λ̂ at each, orthogonal restriction on."""
    p, batches = (11, 600) if quick else (53, 1500)
    return [Job("dynamics", TrainConfig(p=p, batches=batches, checkpoints=25 if not quick else 6, seed=seed),
                study_sgld(chains, 500 if quick else 5000), kind="dynamics") for seed in range(seeds)]


def calibrate(chains: int = 8, seeds: int = 1, quick: bool = False) -> list[Job]:
    """An ε × nβ × γ grid on one trained p = 23 network; ``chains`` chains per cell, one batched run."""
    epsilons = [1e-4, 1e-3, 1e-2] if quick else [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
    scales = [0.5, 1.0, 2.0] if quick else [0.25, 0.5, 1.0, 2.0, 4.0]  # nβ as a multiple of n/log n
    gammas = [5.0] if quick else [1.0, 5.0, 25.0]
    grid = [dict(epsilon=e, nbeta=s, gamma=g) for g in gammas for s in scales for e in epsilons]
    return [Job("calibrate", TrainConfig(p=23, seed=seed), study_sgld(chains, 1000 if quick else 5000),
                kind="calibrate", tags=dict(grid=grid)) for seed in range(seeds)]


def circuits(chains: int = 64, seeds: int = 5, quick: bool = False) -> list[Job]:
    """Circuits against λ̂ are read from the p-sweep's runs: the same jobs (each records its circuits), so
    a sweep directory that holds the p-sweep answers this without running anything again."""
    return psweep(chains, seeds, quick)


SWEEPS = {"psweep": psweep, "circuits": circuits, "architectures": architectures, "memorization": memorization, "dynamics": dynamics,
          "calibrate": calibrate}
