"""The published study's sweeps as lists of jobs (docs/reference/seed_results.json).

Each figure was made with settings of its own (read from the study's repository history).
A sweep runs, by default, the settings its figure was made with ("published"), and where the study's
choice was incidental or inferred also a principled variant beside it; the report shows every variant
side by side, never one in place of another. A variant is a name, the training settings it changes and
the SGLD settings it changes.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, replace

from .. import resources
from ..errors import FastLLCError
from ..validate import check_int
from ..sampling import SGLDConfig
from ..train import TrainConfig, default_batches
from .jobs import Job
from .targets import STUDY_EPSILON, STUDY_GAMMA

PUBLISHED_PSWEEP = {23: 112.8, 29: 157.7, 37: 222.3, 41: 259.4, 47: 312.1, 53: 371.1}  # mean over 5 runs
PUBLISHED_PSWEEP_SD = {23: 1.9, 29: 3.0, 37: 5.5, 41: 12.4, 47: 15.2, 53: 6.7}  # population sd (ddof 0)
PUBLISHED_PSWEEP_BATCHES = {41: 15_000, 53: 15_000}  # every other p: 10,000 (p = 47 too)
PSWEEP_SEEDS_AT_53 = 10  # p = 53 converges in about 3 of 4 runs: its mean and convergence rate need more seeds
PUBLISHED_ARCHITECTURES = {
    (8, 32): {23: 102, 29: 139, 37: 185, 41: 231, 47: 284},
    (16, 32): {23: 112, 29: 158, 37: 196, 41: 256, 47: 330},
    (16, 64): {23: 148, 29: 191, 37: 275, 41: 309, 47: 382},
}
PUBLISHED_MEMORIZATION = {5: 8, 10: 53, 15: 157, 20: 318, 25: 550}  # e=50, h=200, read from the plot
# e=16, h=64 on the random operation, single runs (init ×0.5, 20,000 batches; the study's files at a0bda3f)
PUBLISHED_MEMORIZATION_E16H64 = {10: 32.4, 12: 52, 15: 94.6, 17: 124, 20: 187.5, 23: 261, 25: 294.4, 30: 412.7, 35: 610.2}
# The localisation of the "local" memorisation variants: the smallest γ of {5, 25, 100} (the study's γ, ×5, ×20)
# at which the memorising chains stay local (locality < ½) at the study's ε and nβ: at γ = 5 they climb above
# chance (locality 1.2–2.2), and a smaller ε does not bring them back (it only slows them down); γ = 25 does.
# The calibrate jobs of these variants record that grid (ε × γ on one memorising network per network).
LOCAL_GAMMA = 25.0
# the networks of the memorisation comparison: the random operation's, and the modular addition's beside it
# (None: the p-sweep's e8/h32 network at the p-sweep's training length)
MEMORISATION_NETWORKS = {
    "e50h200": dict(random=dict(embed=50, hidden=200, batches=10_000), add=None, published=PUBLISHED_MEMORIZATION,
                    primes=[5, 10, 15, 20, 25, 30, 35, 40]),
    "e16h64": dict(random=dict(embed=16, hidden=64, init_scale=0.5, batches=20_000),
                   add=dict(embed=16, hidden=64, init_scale=0.5, batches=20_000), published=PUBLISHED_MEMORIZATION_E16H64,
                   primes=sorted(PUBLISHED_MEMORIZATION_E16H64)),
}
# the calibration grid run on one memorising network per network (seed 0, at ``CALIBRATION_P``) by the local
# variants: why γ = LOCAL_GAMMA, read from the sweep's own records
CALIBRATION_GRID = dict(epsilons=(1e-4, 3e-4, 1e-3), gammas=(5.0, 25.0, 100.0))
CALIBRATION_P = {"e50h200": 25, "e16h64": 35}
CHAIN_LENGTHS = (2000, 5000, 10_000)  # memorisation λ̂ against chain length, at the largest published p
CHAIN_LENGTH_P = 25

# name: (training settings, SGLD settings, what it is)
VARIANTS = {
    "psweep": {
        "published": (dict(split="fixed"), dict(orthogonal=True, chain_loss="published"),
                      "as published: +1e-6 chain loss, orthogonal on, one split per p, 10,000 batches (15,000 at p = 41, 53)"),
        "today": (dict(split="per-seed"), dict(orthogonal=True, chain_loss="exact"),
                  "fastllc's earlier settings: exact loss, orthogonal on, a split per seed, 15,000 batches at p ≥ 41"),
    },
    "architectures": {
        "published": (dict(init_scale=0.5), dict(orthogonal=False, chain_loss="published"),
                      "as published (inferred): init ×0.5, 10,000 batches, orthogonal off, +1e-6 chain loss"),
        "published-orth": (dict(init_scale=0.5), dict(orthogonal=True, chain_loss="published"),
                           "as published but orthogonal on: the inferred choice the other way"),
        "today": (dict(), dict(orthogonal=True, chain_loss="exact"),
                  "principled: PyTorch's init, 15,000 batches at p ≥ 41, orthogonal on, exact loss"),
    },
    "memorization": {
        "published": (dict(), dict(orthogonal=False, chain_loss="published"),
                      "as published: +1e-6 chain loss, orthogonal off"),
        "local": (dict(), dict(orthogonal=False, chain_loss="published", gamma=LOCAL_GAMMA),
                  f"local chains: as published but γ = {LOCAL_GAMMA:g}"),
        "e16h64": (dict(network="e16h64"), dict(orthogonal=False, chain_loss="published"),
                   "the same network on both tasks (e16/h64, init ×0.5, 20,000 batches), as published (orthogonal off, inferred)"),
        "e16h64-local": (dict(network="e16h64"), dict(orthogonal=False, chain_loss="published", gamma=LOCAL_GAMMA),
                         f"the same network on both tasks, local chains (γ = {LOCAL_GAMMA:g})"),
        "exact": (dict(), dict(orthogonal=False, chain_loss="exact"), "exact cross-entropy chain loss, orthogonal off"),
        "published-orth": (dict(), dict(orthogonal=True, chain_loss="published"), "+1e-6 chain loss, orthogonal on"),
        "exact-orth": (dict(), dict(orthogonal=True, chain_loss="exact"), "exact chain loss, orthogonal on (fastllc's earlier settings)"),
    },
}
DEFAULT_VARIANTS = {"psweep": ("published",), "architectures": ("published", "published-orth", "today"),
                    "memorization": ("published", "exact", "published-orth", "exact-orth", "local", "e16h64", "e16h64-local")}
CHAIN_LOSS_CHOICES = {"published": ("published",), "exact": ("exact",), "both": ("published", "exact")}


def psweep_batches(p: int, variant: str = "published") -> int:
    """The p-sweep's training length: as published 10,000 batches, 15,000 at p = 41 and 53 only."""
    return PUBLISHED_PSWEEP_BATCHES.get(p, 10_000) if variant == "published" else default_batches(p)


def study_sgld(chains: int, steps: int = 5000, orthogonal: bool = True, chain_loss: str = "exact",
               epsilon: float = STUDY_EPSILON, gamma: float = STUDY_GAMMA) -> SGLDConfig:
    """The study's SGLD: ε = 1e-3, γ = 5, m = 64, nβ = n/log n, no burn-in; by default orthogonal restriction
    on and the exact chain loss (fastllc's earlier settings; the variants above say what each figure used).
    ``epsilon`` and ``gamma``: a variant's own (the local memorisation chains)."""
    return SGLDConfig(chains=chains, steps=steps, epsilon=epsilon, gamma=gamma, batch_size=64, orthogonal=orthogonal,
                      chain_loss=chain_loss)


@dataclass(frozen=True)
class StudyJob(Job):
    """A ``Job`` whose name also says the SGLD settings the study's figures never varied (ε, γ, nβ) where a
    variant changes them: the jobs of every earlier JSON keep their names, and a γ = 25 job does not take a
    γ = 5 job's file. (``jobs.sgld_suffix`` is the natural home of this suffix.)"""

    @property
    def name(self) -> str:
        return super().name + localisation_suffix(self.sgld)


def localisation_suffix(sgld: SGLDConfig) -> str:
    """"-g25", "-eps0.0001", "-nb100" for each of γ, ε, nβ that differs from the study's; empty otherwise."""
    parts = ([f"g{sgld.gamma:g}"] if sgld.gamma != STUDY_GAMMA else []) + \
            ([f"eps{sgld.epsilon:g}"] if sgld.epsilon != STUDY_EPSILON else []) + \
            ([f"nb{sgld.nbeta:g}"] if sgld.nbeta is not None else [])
    return "".join("-" + part for part in parts)


def chosen_variants(sweep: str, variants) -> tuple[str, ...]:
    """The variants to run: ``variants`` (names of the sweep's) or its default ones."""
    known = VARIANTS[sweep]
    variants = tuple(variants) if variants else DEFAULT_VARIANTS[sweep]
    unknown = [v for v in variants if v not in known]
    if unknown:
        raise FastLLCError(f"--variant {unknown[0]}: the {sweep} sweep has variants {', '.join(known)}")
    return variants


def _settings(sweep: str, variant: str, split: str | None, chain_loss: str | None) -> tuple[dict, list[dict]]:
    """A variant's training settings and its SGLD settings, one per chain loss (``--chain-loss``)."""
    training, sgld, _ = VARIANTS[sweep][variant]
    training = dict(training, **({"split": split} if split else {}))
    losses = CHAIN_LOSS_CHOICES[chain_loss] if chain_loss else (sgld["chain_loss"],)
    return training, [dict(sgld, chain_loss=loss) for loss in losses]


def _variant_tag(sweep: str, variant: str, sgld: SGLDConfig) -> str:
    """The variant's name as recorded, saying so when --chain-loss replaced the variant's own chain loss."""
    own = VARIANTS[sweep][variant][1]["chain_loss"]
    return variant if sgld.chain_loss == own else f"{variant} with the {sgld.chain_loss} chain loss"


def _unique(jobs: list[Job]) -> list[Job]:
    """One job per name: two variants that a --chain-loss or --split makes equal run once."""
    return list({job.name: job for job in jobs}.values())


def _check_chain_loss(chain_loss: str | None) -> None:
    if chain_loss is not None and chain_loss not in CHAIN_LOSS_CHOICES:
        raise FastLLCError(f"--chain-loss must be one of {', '.join(CHAIN_LOSS_CHOICES)}, got {chain_loss!r}")


def _counts_checked(builder):
    """Check ``chains`` and ``seeds`` before a sweep's jobs are built: types here, and the job list against
    memory (its length grows linearly with ``seeds``, so a one-seed build, a few jobs, counts it). A
    ``--seeds 100000000000`` is then a one-line error instead of a process killed without a message."""

    @functools.wraps(builder)
    def build(chains: int | None = None, seeds: int | None = None, **options) -> list[Job]:
        if chains is not None:
            check_int("--chains", chains, 1)
        if seeds is not None:
            check_int("--seeds", seeds, 1)
            one_seed = Counter(job.kind for job in builder(seeds=1, **options))
            resources.require_jobs_memory({kind: count * seeds for kind, count in one_seed.items()},
                                          "use fewer --seeds")
        return builder(**({"chains": chains} if chains is not None else {}), seeds=seeds, **options)

    return build


@_counts_checked
def psweep(chains: int = 64, seeds: int | None = None, quick: bool = False, split: str | None = None,
           chain_loss: str | None = None, variants=None, backend: str = "auto") -> list[Job]:
    """λ̂ against p for e=8, h=32; 5 seeds per p and 10 at p = 53 (unless ``seeds`` is given)."""
    _check_chain_loss(chain_loss)
    primes = [17, 23, 29] if quick else sorted(PUBLISHED_PSWEEP)  # quick: the smallest p that generalise
    jobs = []
    for variant in chosen_variants("psweep", variants):
        training, sgld_settings = _settings("psweep", variant, split, chain_loss)
        for sgld_kw in sgld_settings:
            sgld = study_sgld(chains, 1000 if quick else 5000, **sgld_kw)
            for p in primes:
                count = seeds or (PSWEEP_SEEDS_AT_53 if p == 53 else 5)
                for seed in range(count):
                    config = TrainConfig(p=p, batches=psweep_batches(p, variant), checkpoints=1 if quick else 25,
                                         seed=seed, **training)
                    jobs.append(Job("psweep", config, sgld, backend=backend, tags=dict(
                        variant=_variant_tag("psweep", variant, sgld), published=PUBLISHED_PSWEEP.get(p), published_sd=PUBLISHED_PSWEEP_SD.get(p))))
    return _unique(jobs)


@_counts_checked
def architectures(chains: int = 64, seeds: int | None = None, quick: bool = False, split: str | None = None,
                  chain_loss: str | None = None, variants=None, backend: str = "auto") -> list[Job]:
    """Three (e, h) networks at five p: single published runs made with init ×0.5 and 10,000 batches."""
    _check_chain_loss(chain_loss)
    primes = [7, 11] if quick else [23, 29, 37, 41, 47]
    jobs = []
    for variant in chosen_variants("architectures", variants):
        training, sgld_settings = _settings("architectures", variant, split, chain_loss)
        for sgld_kw in sgld_settings:
            sgld = study_sgld(chains, 1000 if quick else 5000, **sgld_kw)
            for (embed, hidden), published in PUBLISHED_ARCHITECTURES.items():
                for p in primes:
                    batches = 3000 if quick else 10_000 if variant.startswith("published") else default_batches(p)
                    for seed in range(seeds or 1):
                        config = TrainConfig(p=p, embed=embed, hidden=hidden, batches=batches,
                                             checkpoints=1 if quick else 25, seed=seed, **training)
                        jobs.append(Job("architectures", config, sgld, backend=backend,
                                        tags=dict(variant=_variant_tag("architectures", variant, sgld), published=published.get(p))))
    return _unique(jobs)


@_counts_checked
def memorization(chains: int = 64, seeds: int | None = None, quick: bool = False, split: str | None = None,
                 chain_loss: str | None = None, variants=None, backend: str = "auto") -> list[Job]:
    """Random commutative operation with a network big enough to memorise (the study's e=50, h=200),
    beside the generalising network of the p-sweep (modular addition, e=8, h=32) at the same p; 3 seeds.
    At p = 25 also one longer chain per memorising run (10,000 steps), whose first 2,000 and 5,000 steps
    give λ̂ against chain length (``CHAIN_LENGTHS``), for the study's γ with the orthogonal restriction off.
    The e16h64 variants put one network (e16/h64, the study's same-architecture comparison) on both tasks; the
    local variants (γ = ``LOCAL_GAMMA``) add one calibration grid on a memorising network (``CALIBRATION_GRID``)."""
    _check_chain_loss(chain_loss)
    jobs = []
    for variant in chosen_variants("memorization", variants):
        training, sgld_settings = _settings("memorization", variant, split, chain_loss)
        network = MEMORISATION_NETWORKS[training.pop("network", "e50h200")]
        for sgld_kw in sgld_settings:
            jobs += _memorization_jobs(variant, network, training, sgld_kw, chains, seeds, quick, backend)
    return _unique(jobs)


def _memorization_jobs(variant: str, network: dict, training: dict, sgld_kw: dict, chains: int, seeds: int | None,
                       quick: bool, backend: str) -> list[Job]:
    """One variant's jobs under one chain loss: per p and seed the memorising and the addition network, the
    chain-length chains (study's γ, orthogonal off) and, for a variant of its own γ, the calibration grid."""
    primes = [11, 17] if quick else network["primes"]
    lengths = tuple(t // 10 for t in CHAIN_LENGTHS) if quick else CHAIN_LENGTHS
    long_p = max(primes) if quick else CHAIN_LENGTH_P
    sgld = study_sgld(chains, lengths[1], **sgld_kw)
    own_gamma = sgld.gamma != STUDY_GAMMA
    tags = dict(variant=_variant_tag("memorization", variant, sgld))
    jobs = []
    for p in primes:
        for seed in range(seeds or 3):
            memorising = TrainConfig(p=p, task="random", checkpoints=1 if quick else 25, seed=seed,
                                     **dict(network["random"], **(dict(batches=4000) if quick else {})), **training)
            add = network["add"] or dict(batches=psweep_batches(p))
            generalising = TrainConfig(p=p, checkpoints=1 if quick else 25, seed=seed,
                                       **dict(add, **(dict(batches=4000) if quick and network["add"] else {})), **training)
            published = None if own_gamma else network["published"].get(p)  # made at γ = 5 only
            jobs.append(StudyJob("memorization", memorising, sgld, backend=backend, tags=dict(tags, published=published)))
            jobs.append(StudyJob("memorization", generalising, sgld, backend=backend, tags=dict(tags, published=None)))
            if p == long_p and not sgld.orthogonal and not own_gamma and network["add"] is None:
                jobs.append(StudyJob("memorization", memorising, replace(sgld, steps=lengths[-1]), backend=backend,
                                     tags=dict(tags, published=published, prefixes=list(lengths[:-1]), chain_length_study=True)))
            if own_gamma and seed == 0 and p == (max(primes) if quick else CALIBRATION_P[_network_name(network)]):
                jobs.append(_calibration_job(memorising, sgld, backend, quick))
    return jobs


def _network_name(network: dict) -> str:
    return next(name for name, known in MEMORISATION_NETWORKS.items() if known is network)


def _calibration_job(training: TrainConfig, sgld: SGLDConfig, backend: str, quick: bool) -> Job:
    """ε × γ at nβ = n/log n on one memorising network: where its chains stay local (the calibrate report)."""
    grid = [dict(epsilon=e, nbeta=1.0, gamma=g) for g in CALIBRATION_GRID["gammas"] for e in CALIBRATION_GRID["epsilons"]]
    return Job("calibrate", training, replace(sgld, chains=4 if not quick else 2, gamma=STUDY_GAMMA), kind="calibrate",
               tags=dict(grid=grid), backend=backend)


@_counts_checked
def dynamics(chains: int = 16, seeds: int | None = None, quick: bool = False, split: str | None = None,
             chain_loss: str | None = None, variants=None, backend: str = "auto") -> list[Job]:
    """p = 53, 1500 batches, 25 checkpoints (one every 60 batches), λ̂ at each, orthogonal restriction on, the
    published chain loss (as the figure was made). All checkpoints' chains run as one batch: this needs a
    backend that stacks starting points and follows the published loss (native, torch); ``--chain-loss exact``
    gives fastllc's earlier settings."""
    _check_chain_loss(chain_loss)
    p, batches = (11, 600) if quick else (53, 1500)
    losses = CHAIN_LOSS_CHOICES[chain_loss] if chain_loss else ("published",)
    return [Job("dynamics", TrainConfig(p=p, batches=batches, checkpoints=25 if not quick else 6, seed=seed,
                                        **({"split": split} if split else {})),
                study_sgld(chains, 500 if quick else 5000, chain_loss=loss), kind="dynamics", backend=backend)
            for loss in losses for seed in range(seeds or 2)]


@_counts_checked
def calibrate(chains: int = 8, seeds: int | None = None, quick: bool = False, split: str | None = None,
              chain_loss: str | None = None, variants=None, backend: str = "auto") -> list[Job]:
    """An ε × nβ × γ grid on one trained p = 23 network; ``chains`` chains per cell, one batched run."""
    _check_chain_loss(chain_loss)
    epsilons = [1e-4, 1e-3, 1e-2] if quick else [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
    scales = [0.5, 1.0, 2.0] if quick else [0.25, 0.5, 1.0, 2.0, 4.0]  # nβ as a multiple of n/log n
    gammas = [5.0] if quick else [1.0, 5.0, 25.0]
    grid = [dict(epsilon=e, nbeta=s, gamma=g) for g in gammas for s in scales for e in epsilons]
    losses = CHAIN_LOSS_CHOICES[chain_loss] if chain_loss else ("exact",)
    return [Job("calibrate", TrainConfig(p=23, seed=seed, **({"split": split} if split else {})),
                study_sgld(chains, 1000 if quick else 5000, chain_loss=loss), kind="calibrate",
                tags=dict(grid=grid), backend=backend)
            for loss in losses for seed in range(seeds or 1)]


@_counts_checked
def circuits(chains: int = 64, seeds: int | None = None, quick: bool = False, split: str | None = None,
             chain_loss: str | None = None, variants=None, backend: str = "auto") -> list[Job]:
    """Circuits against λ̂ are read from the p-sweep's runs: the same jobs (each records its circuits), so
    a sweep directory that holds the p-sweep answers this without running anything again."""
    return psweep(chains=chains, seeds=seeds, quick=quick, split=split, chain_loss=chain_loss, variants=variants,
                  backend=backend)


SWEEPS = {"psweep": psweep, "circuits": circuits, "architectures": architectures, "memorization": memorization, "dynamics": dynamics,
          "calibrate": calibrate}
