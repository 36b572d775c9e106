"""A sweep is a list of jobs; a job is one trained run and its estimate, saved as one JSON file.

Results are written atomically (temporary file + rename) to ``<out>/jobs/<job name>.json``, and a job
whose JSON exists is skipped, so an interrupted sweep loses at most the job in flight. Trained runs live
in ``<out>/runs/`` and are reused by every job that needs them.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tqdm.auto import tqdm

from ..analysis import analyse_run
from ..api import estimate_checkpoints, estimate_run
from ..llc import estimate_llc
from ..sampling import SGLDConfig, batched, default_nbeta
from ..sampling.contract import select_chains
from ..train import Run, TrainConfig, train, train_together


@dataclass(frozen=True)
class Job:
    """Train ``training`` (or reuse the run) and estimate λ̂ with ``sgld``.

    kind "final": λ̂ at the final weights (and, for modular addition, its circuits);
    kind "dynamics": λ̂ at every checkpoint, all checkpoints' chains in one batched run;
    kind "calibrate": a grid of (ε, nβ/(n/log n), γ) cells in ``tags["grid"]``, ``sgld.chains`` chains per
    cell, every cell in one batched run.
    """

    sweep: str
    training: TrainConfig
    sgld: SGLDConfig
    kind: str = "final"
    tags: dict = field(default_factory=dict)  # extra fields for the report (e.g. published value)

    @property
    def name(self) -> str:
        return f"{self.sweep}-{self.training.run_name()}-{self.kind}"


def write_json_atomically(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)


def trained_run(config: TrainConfig, out: Path) -> Run:
    path = out / "runs" / config.run_name()
    return Run.load(path) if path.exists() else train(config, path)


def run_job(job: Job, out: Path, progress: bool = False) -> dict:
    run = trained_run(job.training, out)
    record = dict(job=job.name, sweep=job.sweep, kind=job.kind, training=asdict(job.training),
                  sgld=job.sgld.to_dict(), run=str(run.path), **job.tags)
    if job.kind == "final":
        result = estimate_run(run, config=job.sgld, progress=progress)
        record.update(result=result.to_dict(), final_metrics=run.metrics[-1])
        if job.training.task == "add" and job.training.p >= 3:
            circuits, _ = analyse_run(run)
            record.update(circuits=circuits.learned, circuit_count=circuits.count)
    elif job.kind == "dynamics":
        results = estimate_checkpoints(run, config=job.sgld, progress=progress)
        record.update(steps=run.steps, metrics=run.metrics, results=[r.to_dict() for r in results])
    elif job.kind == "calibrate":
        record.update(cells=calibration_cells(run, job), final_metrics=run.metrics[-1])
    else:
        raise ValueError(f"unknown job kind {job.kind!r}")
    return record


def calibration_cells(run: Run, job: Job) -> list[dict]:
    """Every grid cell's λ̂, split-R̂, ESS and healthy fraction, from one batched run of all cells' chains."""
    grid, per_cell = job.tags["grid"], job.sgld.chains
    pairs, labels = run.task().train_data()
    base = default_nbeta(len(labels))
    settings = {name: [cell[name] * (base if name == "nbeta" else 1) for cell in grid for _ in range(per_cell)]
                for name in ("epsilon", "nbeta", "gamma")}
    config = replace(job.sgld, chains=len(grid) * per_cell, **settings)
    samples = batched.sample_starts([batched.Start(run.load_model(), pairs, labels)], config)[0]
    cells = []
    for index, cell in enumerate(grid):
        chains = range(index * per_cell, (index + 1) * per_cell)
        result = estimate_llc(select_chains(samples, chains), replace(job.sgld, chains=per_cell))
        cells.append(dict(cell, llc_mean=result.llc_mean, llc_se=result.llc_se, r_hat=result.r_hat, ess=result.ess,
                          healthy_fraction=result.healthy_chains / per_cell, **result.loss_trace_summary))
    return cells


def train_missing_runs(jobs: list[Job], out: Path, progress: bool = True) -> None:
    """Train every run the unfinished jobs need and that does not exist yet; runs that differ only in
    their seed train together as one batch (``train_together``)."""
    missing = {}
    for job in jobs:
        if not (out / "jobs" / f"{job.name}.json").exists() and not (out / "runs" / job.training.run_name()).exists():
            missing[job.training.run_name()] = job.training
    groups: dict[TrainConfig, list[TrainConfig]] = {}
    for config in missing.values():
        groups.setdefault(replace(config, seed=0), []).append(config)
    for configs in tqdm(list(groups.values()), desc="training", disable=not progress):
        train_together(configs, [out / "runs" / c.run_name() for c in configs])


def run_sweep(jobs: list[Job], out: str | os.PathLike, progress: bool = True) -> list[dict]:
    """Run every job whose JSON is missing; return all jobs' records (finished earlier or now).

    Missing runs are trained first, seeds of one configuration together (an interruption loses at most
    the group in flight); then each job's estimate runs and its JSON is written.
    """
    out = Path(out)
    train_missing_runs(jobs, out, progress)
    records = []
    for job in tqdm(jobs, desc="jobs", disable=not progress):
        path = out / "jobs" / f"{job.name}.json"
        if path.exists():
            records.append(json.loads(path.read_text()))
            continue
        record = run_job(job, out, progress=False)
        write_json_atomically(path, record)
        records.append(record)
    return records


def load_records(out: str | os.PathLike) -> list[dict]:
    folder = Path(out) / "jobs"
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []

