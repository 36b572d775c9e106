"""A sweep is a list of jobs; a job is one trained run and its estimate, saved as one JSON file.

Results are written atomically (temporary file + rename) to ``<out>/jobs/<job name>.json``, and a job
whose JSON exists is skipped, so an interrupted sweep loses at most the job in flight. Trained runs live
in ``<out>/runs/`` and are reused by every job that needs them. Any number of processes may run sweeps
into one directory at once: a run or a job finished first by one is adopted by the others. A damaged job
JSON (a crash or a full disk under an older version) is moved aside with a warning and its job run again.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import resources, storage
from ..analysis import analyse_run
from ..api import estimate_checkpoints, estimate_run
from ..errors import FastLLCError
from ..llc import divergence_advice, estimate_llc
from ..sampling import SGLDConfig, wbic_nbeta
from ..sampling.contract import Samples
from ..tasks import train_size
from ..train import Run, TrainConfig, cached_run, train_together


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
    backend: str = "auto"  # the sampling backend asked for (recorded; the one used is in the result)
    device: str = "cpu"  # where the chains run (the result records it)

    @property
    def name(self) -> str:
        return f"{self.sweep}-{self.training.run_name()}-{self.kind}{sgld_suffix(self.sgld)}"


BASELINE_STEPS = 5000  # the study's chain length: a job of another length says so in its name


def sgld_suffix(sgld: SGLDConfig) -> str:
    """The part of a job's name that tells its SGLD settings apart from those its sweep used before they
    could vary (exact chain loss, orthogonal restriction on, 5000 steps): empty for those, so that job
    JSONs written then keep their names and are not run again."""
    parts = (["published-loss"] if sgld.chain_loss == "published" else []) + \
            (["orth-off"] if not sgld.orthogonal else []) + \
            ([f"T{sgld.steps}"] if sgld.steps != BASELINE_STEPS else [])
    return "".join("-" + part for part in parts)


def write_json_atomically(path: Path, record: dict) -> None:
    storage.write_atomically(path, json.dumps(record, indent=1) + "\n")


def publish_record(path: Path, record: dict, check=None) -> dict:
    """Write a job's JSON unless another process finished the job first; the record on disk wins.
    ``check``: as in ``finished_record`` (default ``record_problem``)."""
    if storage.publish_file_once(path, json.dumps(record, indent=1) + "\n"):
        return record
    existing = finished_record(path, check=check or record_problem)
    if existing is None:  # it was damaged and is now moved aside: ours replaces it
        write_json_atomically(path, record)
        return record
    return existing


RESULT_KEYS = {"final": ("result",), "dynamics": ("steps", "metrics", "results"), "calibrate": ("cells",)}


def record_problem(record) -> str | None:
    """What makes ``record`` unusable as a finished job's record (None: nothing)."""
    if not isinstance(record, dict):
        return "not a JSON object"
    for key in ("job", "sweep", "kind", "training"):
        if key not in record:
            return f"no {key!r} field: not a fastllc job record"
    if not isinstance(record["training"], dict) or not isinstance(record["training"].get("p"), int):
        return "no training.p"
    if record["kind"] not in RESULT_KEYS:
        return f"unknown job kind {record['kind']!r}"
    for key in RESULT_KEYS[record["kind"]]:
        if key not in record:
            return f"no {key!r} field"
    if record["kind"] == "final" and not (isinstance(record["result"], dict) and "llc_mean" in record["result"]):
        return "no result.llc_mean"
    return None


def read_record(path: Path, check=record_problem) -> tuple[dict | None, str | None]:
    """A job JSON's record, or None and what is wrong with it (missing file: None, None); ``check(record)``
    says what makes a record unusable (``record_problem`` for the sweeps' jobs)."""
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as err:  # ValueError: truncated or empty JSON, bad UTF-8
        return None, f"unreadable: {err}" if str(err) else "unreadable"
    problem = check(record)
    return (None, problem) if problem else (record, None)


def finished_record(path: Path, job: Job | None = None, check=record_problem) -> dict | None:
    """The record of a finished job; None if there is none. A damaged JSON is moved aside with a warning,
    so that the job runs again."""
    record, problem = read_record(path, check)
    if record is not None and job is not None and record["job"] != job.name:
        record, problem = None, f"it is the record of another job, {record['job']!r}"
    if problem is None:
        return record
    aside = storage.move_aside(path)
    if aside is not None:
        warnings.warn(f"{path} is damaged ({problem}); moved it to {aside.name} and running its job again",
                      RuntimeWarning, stacklevel=2)
    return None


def trained_run(config: TrainConfig, out: Path) -> Run:
    return cached_run(config, out)


def run_job(job: Job, out: Path, progress: bool = False) -> dict:
    run = trained_run(job.training, out)
    record = dict(job=job.name, sweep=job.sweep, kind=job.kind, training=asdict(job.training),
                  sgld=job.sgld.to_dict(), backend_requested=job.backend, run=str(run.path), **job.tags)
    if job.kind == "final":
        result = estimate_run(run, config=job.sgld, progress=progress, backend=job.backend, device=job.device)
        record.update(result=result.to_dict(), final_metrics=run.metrics[-1])
        record.update(chain_locality(record["result"], job.training.p))
        if job.tags.get("prefixes"):
            record.update(prefix_results=prefix_results(result, job.sgld, job.tags["prefixes"]))
        if job.training.task == "add" and job.training.p >= 3:
            circuits, _ = analyse_run(run)
            record.update(circuits=circuits.learned, circuit_count=circuits.count)
    elif job.kind == "dynamics":
        results = estimate_checkpoints(run, config=job.sgld, progress=progress, backend=job.backend, device=job.device)
        record.update(steps=run.steps, metrics=run.metrics, results=[r.to_dict() for r in results])
        for result in record["results"]:  # each checkpoint's chains: local or not, beside its λ̂
            result.update(chain_locality(result, job.training.p))
    elif job.kind == "calibrate":
        record.update(cells=calibration_cells(run, job), final_metrics=run.metrics[-1])
    else:
        raise ValueError(f"unknown job kind {job.kind!r}")
    require_some_healthy(record, job.sgld, run.config.make_task().n_train)
    return record


def chain_locality(result: dict, p: int) -> dict:
    """{"locality", "trivial_loss", "nonlocal"} of one estimate, from its own chains: (mean sampled loss − L_n(w*))
    / (log p − L_n(w*)), ``fastllc.calibration``'s locality with the trivial loss of the study's cross-entropy
    MLPs: every weight zero gives zero logits, the uniform predictor, loss log p (``curvature.trivial_loss``;
    the +1e-6 chain loss moves it by p·1e-6). "nonlocal" above ``calibration.LOCALITY_LIMIT`` (½): the chains
    went more than halfway from w* to knowing nothing, and λ̂ = nβ·ΔL then measures the temperature (a ΔL
    near log p gives λ̂ ≈ nβ·log p = n at nβ = n/log n), not the geometry at w*. None for both when the
    estimate has no mean sampled loss (no healthy chain)."""
    from ..calibration import LOCALITY_LIMIT

    mean_loss = (result.get("loss_trace_summary") or {}).get("mean_loss")
    init_loss = result.get("init_loss")
    trivial = math.log(p)
    if mean_loss is None or init_loss is None or not trivial > init_loss:
        return {"locality": None, "trivial_loss": trivial, "nonlocal": None}
    locality = (mean_loss - init_loss) / (trivial - init_loss)
    return {"locality": locality, "trivial_loss": trivial, "nonlocal": bool(locality > LOCALITY_LIMIT)}


class AllChainsDiverged(FastLLCError):
    """A job ended with no λ̂: every chain diverged. Its record is not written (a rerun with other settings
    then runs it again); the sweep goes on and ends with ``executors.JobsFailed``, exit status 1."""


def require_some_healthy(record: dict, sgld: SGLDConfig, n_train: int) -> None:
    """Raise ``AllChainsDiverged`` when the record holds no λ̂ at all: every chain of the estimate (of every
    checkpoint, of every calibration cell) diverged. A sweep must not record that as a finished job."""
    results = record.get("results") or record.get("cells") or [record.get("result", {})]
    if any(r.get("healthy_chains", r.get("healthy_fraction", 0)) for r in results):
        return
    advice = divergence_advice(sgld.epsilon, sgld.nbeta, wbic_nbeta(n_train), prefix="sgld.")
    raise AllChainsDiverged(f"every chain diverged (non-finite or exploding loss), no λ̂; {advice}")


def prefix_results(result, sgld: SGLDConfig, lengths) -> list[dict]:
    """λ̂ and its diagnostics over the first T steps of the chains, for each T in ``lengths`` (< sgld.steps).

    Each chain's step t depends only on (seed, chain, t), so the first T records of a long chain are
    exactly the records of a chain of T steps: one long run gives every shorter length's estimate."""
    C = result.chains
    out = []
    for steps in lengths:
        if not 0 < steps < sgld.steps:
            raise FastLLCError(f"a chain-length prefix must be in (0, {sgld.steps}), got {steps}")
        per_chain = {name: torch.as_tensor(getattr(result, name), dtype=torch.float64).reshape(-1).expand(C).clone()
                     for name in ("epsilon", "gamma", "nbeta")}
        samples = Samples(loss_trace=result.loss_trace[:, :steps].clone(), init_loss=result.init_loss, **per_chain,
                          backend=result.backend, device=result.device,
                          seconds=result.sampling_seconds * steps / sgld.steps)
        with warnings.catch_warnings():  # unhealthy chains were warned about once, by the full estimate
            warnings.simplefilter("ignore", RuntimeWarning)
            out.append(estimate_llc(samples, replace(sgld, steps=steps)).to_dict())
    return out


def calibration_cells(run: Run, job: Job) -> list[dict]:
    """Every grid cell's λ̂ ± se, healthy fraction, drift, split-R̂, ESS and flags, from one batched run of all
    cells' chains (``fastllc.calibration.run_cells``, the code behind ``fastllc.calibrate``); nβ stays in the
    record as the grid gives it, a multiple of n/log n."""
    from ..calibration import run_cells

    grid, per_cell = job.tags["grid"], job.sgld.chains
    data = run.task().train_data()
    base = wbic_nbeta(len(data[1]))
    cells = [(cell["epsilon"], cell["nbeta"] * base, cell["gamma"]) for cell in grid]
    result = run_cells(run.load_model(), data, F.cross_entropy, cells, chains=per_cell, default_nbeta=base,
                       config=job.sgld)  # backend auto on the CPU: the study's MLP
    return [dict(cell, **{k: v for k, v in measured.to_dict().items() if k not in cell})
            for cell, measured in zip(grid, result.cells)]


PROGRESS_MODES = {True: "bar", "bar": "bar", "log": "log", False: "off", "off": "off"}


def progress_mode(progress: bool | str) -> str:
    """"bar" (tqdm), "log" (a line per finished job on stderr) or "off", from a sweep's ``progress``:
    True, "log", False, or "auto" (bars on a terminal, log lines otherwise, e.g. into a log file)."""
    if progress == "auto":
        return "bar" if sys.stderr.isatty() else "log"
    if progress not in PROGRESS_MODES:
        raise FastLLCError(f"progress must be True, False, 'log' or 'auto', got {progress!r}")
    return PROGRESS_MODES[progress]


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _summary(record: dict) -> str:
    """λ̂ of a finished job, in a few words, for its log line."""
    def llc(result):
        return "–" if result.get("llc_mean") is None else f"{result['llc_mean']:.1f}"
    if record["kind"] == "final":
        return f"λ̂ {llc(record['result'])}"
    if record["kind"] == "dynamics":
        return f"λ̂ {llc(record['results'][0])} → {llc(record['results'][-1])} over {len(record['results'])} checkpoints"
    return f"{len(record['cells'])} calibration cells"


def train_missing_runs(jobs: list[Job], out: Path, progress: bool | str = True) -> None:
    """Train every run the unfinished jobs need and that does not exist yet; runs that differ only in
    their seed train together as one batch (``train_together``). ``progress`` as in ``run_sweep``."""
    mode = progress_mode(progress)
    missing = {}
    for job in jobs:
        if not (out / "jobs" / f"{job.name}.json").exists() and not (out / "runs" / job.training.run_name()).exists():
            missing[job.training.run_name()] = job.training
    groups: dict[TrainConfig, list[TrainConfig]] = {}
    for config in missing.values():
        groups.setdefault(replace(config, seed=0), []).append(config)
    for number, configs in enumerate(tqdm(list(groups.values()), desc="training", disable=mode != "bar"), start=1):
        start = time.perf_counter()
        train_together(configs, [out / "runs" / c.run_name() for c in configs], adopt=True)
        if mode == "log":
            seeds = ", ".join(str(c.seed) for c in configs)
            _log(f"[training {number}/{len(groups)}] {configs[0].run_name().rsplit('-seed', 1)[0]}, "
                 f"seed{'s' * (len(configs) > 1)} {seeds} ({time.perf_counter() - start:.0f} s)")


def require_jobs_memory(jobs: list) -> None:
    """Refuse, before any training, a sweep one of whose jobs cannot fit: its training, or its chains
    (``chains`` per checkpoint of a dynamics job, per cell of a calibration grid). Without this a sweep
    trains every run first and then fails each job at its estimate."""
    from collections import Counter

    resources.require_jobs_memory(Counter(getattr(job, "kind", "estimate") for job in jobs), "run fewer jobs")
    seen = set()
    for job in jobs:
        if not isinstance(job, Job):  # an EstimateJob's model is known only on its worker
            continue
        t, sgld = job.training, job.sgld
        batch = sgld.chains * {"dynamics": t.checkpoints + 1, "calibrate": len(job.tags.get("grid", [1]))}.get(job.kind, 1)
        if (t, batch, sgld.steps, sgld.batch_size) in seen:
            continue
        seen.add((t, batch, sgld.steps, sgld.batch_size))
        resources.require_training_memory(t.p, t.embed, t.hidden)
        start, chains = resources.mlp_sampling_bytes(t.p, t.embed, t.hidden, train_size(t.p, t.train_frac), batch,
                                                     sgld.steps, sgld.batch_size)
        advice = resources.sampling_advice(batch, sgld.steps, resources.mlp_parameters(t.p, t.embed, t.hidden),
                                           resources.mlp_minibatch_bytes(t.p, t.embed, t.hidden, sgld.batch_size),
                                           "batch_size (the spec's [sgld] batch_size)",
                                           "chains or steps (--chains, or the spec's [sgld] chains, steps)")
        resources.require_memory(start + chains, f"job {job.name} ({batch:,} chains × {sgld.steps:,} steps)",
                                 "sampling", advice)


def open_sweep(jobs: list, out: str | os.PathLike, finished=finished_record) -> tuple[Path, dict, dict]:
    """Before any work: every job fits in memory (``require_jobs_memory``), ``out`` writable (a sweep that
    cannot save its results must not start), crashed processes' temporaries removed; (out, {job name: its
    JSON path}, {job name: ``finished(path, job)``, the record of a job done earlier or None})."""
    require_jobs_memory(jobs)
    out = Path(out)
    storage.check_writable_dir(out)
    for folder in (out, out / "jobs", out / "runs"):
        storage.remove_stale_temporaries(folder)
    paths = {job.name: out / "jobs" / f"{job.name}.json" for job in jobs}
    return out, paths, {job.name: finished(paths[job.name], job) for job in jobs}


def run_sweep(jobs: list[Job], out: str | os.PathLike, progress: bool | str = "auto", *, executor: str = "local",
              workers: int | None = None, address: str | None = None) -> list[dict]:
    """Run every job whose JSON is missing; return all jobs' records (finished earlier or now).

    ``executor="ray"`` or ``workers``: the jobs go to ``executors.run_jobs`` (Ray tasks, or local processes);
    the default runs them here, one after another.

    Missing runs are trained first, seeds of one configuration together (an interruption loses at most
    the group in flight); then each job's estimate runs and its JSON is written. ``progress``: True
    (progress bars), "log" (one line per finished job on stderr), False, or "auto" (bars on a terminal,
    log lines otherwise).
    """
    if executor != "local" or workers or address:
        from .executors import run_jobs
        return run_jobs(jobs, out, executor=executor, workers=workers, address=address, progress=progress)
    mode = progress_mode(progress)
    out, paths, finished = open_sweep(jobs, out)
    todo = [job for job in jobs if finished[job.name] is None]
    if mode == "log" and len(todo) < len(jobs):
        _log(f"{len(jobs) - len(todo)} of {len(jobs)} jobs finished earlier in {out / 'jobs'}; running {len(todo)}")
    train_missing_runs(todo, out, progress=mode)
    failures = {}
    for number, job in enumerate(tqdm(todo, desc="jobs", disable=mode != "bar"), start=1):
        start, by = time.perf_counter(), ""
        record = finished_record(paths[job.name], job)  # another process may have finished it meanwhile
        if record is None:
            try:
                record = publish_record(paths[job.name], run_job(job, out, progress=False))
            except AllChainsDiverged as err:  # this job's own failure: the others still run
                failures[job.name] = str(err)
                if mode != "off":
                    tqdm.write(f"job {job.name} failed: {err}", file=sys.stderr)
                continue
        else:
            by = ", by another process"
        finished[job.name] = record
        if mode == "log":
            _log(f"[{number}/{len(todo)}] {job.name}: {_summary(record)} ({time.perf_counter() - start:.0f} s{by})")
    done = [finished[job.name] for job in jobs if finished[job.name] is not None]
    if failures:
        from .executors import JobsFailed

        raise JobsFailed(failures, done, len(jobs))
    return done


def load_records(out: str | os.PathLike, check=None) -> list[dict]:
    """Every valid job record under ``<out>/jobs``; a damaged or foreign JSON (or one for which ``check``,
    a function of a record, returns a problem) is skipped with a warning naming the file."""
    folder = Path(out) / "jobs"
    records = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        record, problem = read_record(path)
        if record is not None and check is not None:
            problem = check(record)
        if problem is not None:
            warnings.warn(f"skipping {path}: {problem}", RuntimeWarning, stacklevel=2)
        elif record is not None:
            records.append(record)
    return records


def recount_circuits(out: str | os.PathLike, scratch: str | os.PathLike, write: bool = True) -> list[dict]:
    """Re-count the circuits of every modular-addition "final" job under ``<out>/jobs`` by the current rule
    (``analysis.circuits.CIRCUIT_RULE``), from its network retrained into ``<scratch>/runs`` (a sweep's
    directory keeps no runs once published). A record is rewritten only when its retrained run reproduces it
    bit-for-bit as far as the record shows: the same final train loss, test loss and test accuracy, and the
    rule it was counted with (magnitude and roundness only, ``candidate_frequencies``) giving its recorded
    circuits again; the earlier count is kept in ``circuits_rules_1_2``. Returns one row per job:
    {file, reproduced, before, after}; rows of records that were not reproduced keep ``after`` None."""
    from ..analysis.circuits import CIRCUIT_RULE, candidate_frequencies, learned_frequencies
    from ..analysis.fourier import fourier_modes

    out, scratch = Path(out), Path(scratch)
    paths = [path for path in sorted((out / "jobs").glob("*.json"))]
    records = {path: read_record(path)[0] for path in paths}
    records = {path: r for path, r in records.items()
               if r is not None and r["kind"] == "final" and r.get("circuits") is not None}
    configs = {path: TrainConfig(**r["training"]) for path, r in records.items()}
    groups: dict[TrainConfig, dict[str, TrainConfig]] = {}
    for config in configs.values():
        groups.setdefault(replace(config, seed=0), {})[config.run_name()] = config
    for group in groups.values():  # the seeds of one configuration train together, as the sweep trained them
        train_together(list(group.values()), [scratch / "runs" / name for name in group], adopt=True)
    rows = []
    for path, record in records.items():
        run = Run.load(scratch / "runs" / configs[path].run_name())
        final, recorded = run.metrics[-1], record.get("final_metrics", {})
        modes = fourier_modes(run.load_model(run.checkpoint_index(None)).embed.weight.detach().double().numpy())
        before = record.get("circuits_rules_1_2", record["circuits"])
        reproduced = (all(final.get(k) == recorded.get(k) for k in ("train_loss", "test_loss", "test_acc"))
                      and candidate_frequencies(modes) == before)
        after = learned_frequencies(modes) if reproduced else None
        rows.append(dict(file=path.name, reproduced=reproduced, before=before, after=after))
        if reproduced and write:
            record.update(circuits_rules_1_2=before, circuits=after, circuit_count=len(after), circuit_rule=CIRCUIT_RULE)
            write_json_atomically(path, record)
    return rows
