"""The seed-spread test: the p-sweep as published, but with the study's data order.

    python examples/seed_spread_shared_batches.py --out sweeps/seed-spread [--p 23 --p 53] [--chains 16]

The study's training script (nrimsky/devinterp, ``modular_addition/train.py`` and ``dataset.py`` at
ecf7995 … c818e82) draws every minibatch with Python's global ``random.choices``, and its
``train_test_split`` calls ``random.seed(random_seed)`` just before training starts; ``random_seed`` is 0 in
every run file (``experiment_params/psweep_repeats/{p}_{run}.json``). So the five runs of a p share the split
*and the whole sequence of minibatches*; only the initialisation (torch's global generator, never seeded)
differs. fastllc's ``--split fixed`` shares the split, but each seed draws its own minibatches
(``fastllc.train``: ``generator(seed, "batches")``).

This script runs the p-sweep's published jobs (``experiments.sweeps.psweep``: +1e-6 chain loss, orthogonal
on, one split per p, 10,000 batches, 15,000 at p = 41 and 53) with every seed drawing seed 0's minibatch
stream, so that runs differ by their initialisation alone, as the study's did. TrainConfig has no such
option, so the script replaces ``fastllc.train.generator`` for the "batches" stream in this process (the
sweep runs in this process); the jobs are named ``...-shared-batches`` and record ``batch_order: "shared"``,
which ``fastllc report`` shows as a settings group of its own ("one batch order per p"). Seed 0's run is
the published sweep's seed 0 run bit for bit (same initialisation, split and batches): its λ̂ must equal
that job's, a check that only the other seeds' batches changed.

About 10 minutes on two busy cores for the default six p (5 seeds, 10 at p = 53, 16 chains).
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass
from pathlib import Path

from fastllc.experiments import Job, run_jobs, write_report
from fastllc.experiments.sweeps import psweep
from fastllc.seeding import generator

SHARED_SEED = 0  # the study's random_seed, the same in every run
TRAIN_MODULE = importlib.import_module("fastllc.train")  # the module (``fastllc.train`` is also a function)


def shared_batches(seed, *keys, **options):
    """``fastllc.seeding.generator`` with the minibatch stream of every run set to seed 0's."""
    return generator(SHARED_SEED if keys == ("batches",) else seed, *keys, **options)


@dataclass(frozen=True)
class SharedBatchesJob(Job):
    """A p-sweep job trained on seed 0's minibatch stream: named apart from the published sweep's job."""

    @property
    def name(self) -> str:
        return super().name + "-shared-batches"


def jobs(chains: int, primes: list[int] | None) -> list[Job]:
    """The published p-sweep's jobs (at ``primes``, all by default), each trained on the shared stream."""
    published = [job for job in psweep(chains=chains) if not primes or job.training.p in primes]
    return [SharedBatchesJob(job.sweep, job.training, job.sgld, job.kind, dict(job.tags, batch_order="shared"),
                             job.backend, job.device) for job in published]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("sweeps/seed-spread"))
    parser.add_argument("--p", type=int, action="append", help="only these p (repeatable) [default: all six]")
    parser.add_argument("--chains", type=int, default=16)
    args = parser.parse_args()
    TRAIN_MODULE.generator = shared_batches  # this process trains every run of the sweep (in-process executor)
    records = run_jobs(jobs(args.chains, args.p), args.out, progress="log")
    print(f"{len(records)} jobs in {args.out}; report: {write_report(args.out)}")


if __name__ == "__main__":
    main()
