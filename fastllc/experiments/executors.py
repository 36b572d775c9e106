"""Run a sweep's jobs in this process, in local worker processes, or as Ray tasks on a cluster.

``run_jobs(jobs, out, executor=...)`` is the one driver of every sweep (``fastllc reproduce`` and ``fastllc
sweep``), for any job that follows ``protocol.SweepJob`` (``jobs.Job``, ``spec.EstimateJob``):

- ``"local"`` (default, no extra dependency): in this process, one job after another; with ``workers=N``,
  in N processes (``concurrent.futures``, spawn) on this machine. Local workers share ``out`` with the
  driver: each trains a missing run into ``<out>/runs`` (``train_together``, adopting a run another process
  finished first) and estimates there.
- ``"ray"``: one Ray core task per job (``num_cpus``, and a fractional ``num_gpus`` for a job on CUDA, so
  several small jobs share a GPU), retried by Ray when its worker dies (``max_retries``).

No shared filesystem is needed with Ray. A training run that several jobs need (its seeds, its checkpoints)
is trained ONCE, by one task per group of runs that differ only in their seed, and SHIPPED: the task returns
the run directory as ``{relative path: bytes}``; the driver publishes it under ``<out>/runs`` and puts it
once into Ray's object store, from which every estimate task that needs it fetches it (once per node) and
unpacks it into a private scratch directory. Runs already in ``<out>/runs`` are shipped from there. So
every executor estimates on the same run files with the same ``job.run``: the numbers are bit-identical
(tests/test_executors.py). Nothing is recomputed on the workers.

Safeguards, the same for every sweep: jobs with one name (one JSON file) are refused before any work, and so
is a finished JSON whose settings differ from its job's (its numbers would silently stand for other
settings). The driver writes each job's JSON atomically as its record arrives (``job.publish``); a job whose
JSON exists is skipped, so an interrupted driver loses at most the jobs in flight. A job that fails for a
reason of its own (a ``FastLLCError``: bad settings, every chain diverged) is reported in one line and the
others go on; at the end ``JobsFailed`` (a ``FastLLCError``) lists the failed jobs. A full disk stops the
sweep at once, in one line: every later job would fail the same way.
"""

from __future__ import annotations

import errno
import os
import pickle
import sys
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from .. import resources, storage
from ..errors import FastLLCError
from ..sampling.threads import single_threaded_torch
from ..train import TrainConfig, train_together, usable_run
from .pools import RAY_MISSING, open_pool
from .protocol import job_path, job_problem

EXECUTORS = ("local", "ray")
DEFAULT_RETRIES = 3  # reruns of a job whose worker process died (not of a job that raised)


class JobsFailed(FastLLCError):
    """Some jobs failed (each reported in one line as it failed); the others' records are kept."""

    def __init__(self, failures: dict[str, str], records: list[dict], total: int):
        names = ", ".join(list(failures)[:3]) + (", ..." if len(failures) > 3 else "")
        reasons = set(failures.values())  # one shared reason (every job diverged) is worth saying here
        why = f": {reasons.pop()}" if len(reasons) == 1 and len(failures) > 1 else ""
        saved = "the others are saved" if len(failures) < total else "none finished"
        super().__init__(f"{len(failures)} of {total} jobs failed ({names}){why}; {saved}: fix the failed jobs' "
                         "settings and rerun (finished jobs are skipped)")
        self.failures, self.records = failures, records


# ---- what runs on a worker (module-level functions: pickled by reference) ----

def pack_directory(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` as {relative POSIX path: bytes}: a run directory to send to another machine."""
    return {f.relative_to(path).as_posix(): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def unpack_directory(files: dict[str, bytes], path: Path) -> None:
    """Write ``files`` (from ``pack_directory``) under ``path`` (a new directory)."""
    for name, data in files.items():
        target = path / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            raise FastLLCError(f"refusing to unpack {name!r}: not a relative path inside the run")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def _out_of_space(err: BaseException | None) -> bool:
    """Whether ``err`` comes from a full disk or quota (``storage.disk_error`` keeps the OSError as context)."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        err = err.__context__
    return False


def _outcome(work: Callable, *args) -> tuple[str, object, float]:
    """(outcome, value, seconds): ("ok", what ``work`` returned), ("failed", a one-line reason: a job's own
    failure must not end the sweep) or ("stop", a one-line reason: a full disk, which every later job would
    meet too). A FastLLCError says it all; any other exception's type says where to look."""
    start = time.perf_counter()
    try:
        return "ok", work(*args), time.perf_counter() - start
    except FastLLCError as err:
        return "stop" if _out_of_space(err) else "failed", str(err), time.perf_counter() - start
    except Exception as err:
        return "failed", (f"{type(err).__name__}: {err}".splitlines() or [""])[0], time.perf_counter() - start


def train_task(configs: list[TrainConfig], root: str | None) -> tuple[str, object, float]:
    """Train runs that differ only in their seed, together. ``root``: the shared sweep directory (the
    runs land in ``root/runs``); None: in a scratch directory, returned packed as {run name: files}."""
    return _outcome(_train, configs, root)


def _train(configs: list[TrainConfig], root: str | None) -> dict[str, dict[str, bytes]]:
    if root is not None:
        train_together(configs, [Path(root) / "runs" / c.run_name() for c in configs], adopt=True)
        return {}
    with tempfile.TemporaryDirectory(prefix="fastllc-train-") as scratch:
        outs = [Path(scratch) / c.run_name() for c in configs]
        train_together(configs, outs)
        return {c.run_name(): pack_directory(out) for c, out in zip(configs, outs)}


def job_task(job, root: str | None, run_files: dict[str, bytes] | None) -> tuple[str, object, float]:
    """As ``_outcome``, for one job: "ok" and its record, or "found" and the record another process wrote
    since the sweep began. ``root``: the shared sweep directory; None: a scratch directory into which
    ``run_files`` (the job's training run, packed) are unpacked."""
    if root is not None:  # another process running this sweep may have finished the job meanwhile
        outcome, record, seconds = _outcome(job.finished, job_path(Path(root), job.name))
        if outcome != "ok" or record is not None:
            return "found" if outcome == "ok" else outcome, record, seconds
    return _outcome(_run, job, root, run_files)


@single_threaded_torch()
def _run(job, root: str | None, run_files: dict[str, bytes] | None) -> dict:
    """One job, with torch's intra-op threads at 1 wherever it runs: the numbers must not depend on the
    worker's thread count (L_n(w*) and its gradient differ in the last bits between 1 and 2 threads, seen
    at p = 11), and sampling runs its own single-threaded chain groups anyway (sampling/threads.py)."""
    if root is not None:
        return job.run(Path(root))
    with tempfile.TemporaryDirectory(prefix="fastllc-job-") as scratch:
        if run_files is not None:
            unpack_directory(run_files, Path(scratch) / "runs" / job.training.run_name())
        return job.run(Path(scratch))


# ---- the driver ----

def check_options(executor: str, workers: int | None, address: str | None) -> None:
    """One-line errors for bad executor options, before any work."""
    if executor not in EXECUTORS:
        raise FastLLCError(f"unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise FastLLCError(f"--workers must be a whole number of at least 1, got {workers!r}")
    if address is not None and executor != "ray":
        raise FastLLCError("--address is for --executor ray (the address of a Ray cluster)")
    if executor == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise FastLLCError(RAY_MISSING) from None


def check_jobs(jobs: list, executor: str, workers: int | None) -> None:
    """Jobs (``protocol.SweepJob``) with distinct names; picklable where they travel to other processes."""
    seen = set()
    for job in jobs:
        problem = job_problem(job)
        if problem:
            raise FastLLCError(f"{job!r} is not a job ({problem}): give jobs.Job or spec.EstimateJob objects")
        if job.name in seen:
            raise FastLLCError(f"two jobs are named {job.name!r}: each job needs its own name (its JSON file)")
        seen.add(job.name)
    if executor == "ray" or workers:
        for job in jobs:
            try:
                pickle.dumps(job)
            except Exception as err:
                raise FastLLCError(f"job {job.name!r} cannot be sent to worker processes ({type(err).__name__}: "
                                   f"{err}); make its model and data factories module-level functions") from None


PROGRESS_MODES = {True: "bar", "bar": "bar", "log": "log", False: "off", "off": "off"}


def progress_mode(progress: bool | str) -> str:
    """"bar" (tqdm), "log" (a line per finished job on stderr) or "off", from a sweep's ``progress``:
    True, "log", False, or "auto" (bars on a terminal, log lines otherwise, e.g. into a log file)."""
    if progress == "auto":
        return "bar" if sys.stderr.isatty() else "log"
    if progress not in PROGRESS_MODES:
        raise FastLLCError(f"progress must be True, False, 'log' or 'auto', got {progress!r}")
    return PROGRESS_MODES[progress]


def _refusal(path: Path, job, mismatch: str) -> str:
    return (f"{path} holds job {job.name} with other settings ({mismatch}); give another --out, or remove that "
            "file to run the job again")


def prior_record(path: Path, job) -> dict | None:
    """The job's finished record, None to run it (a damaged JSON is moved aside with a warning); a record
    made with other settings is an error."""
    record = job.finished(path)
    if record is not None:
        mismatch = job.mismatch(record)
        if mismatch:
            raise FastLLCError(_refusal(path, job, mismatch))
    return record


def open_sweep(jobs: list, out: str | os.PathLike) -> tuple[Path, dict]:
    """Before any work: every job fits in memory (a sweep that trains every run first would otherwise fail
    each job at its estimate), ``out`` writable (a sweep that cannot save its results must not start),
    crashed processes' temporaries removed; (out, {job name: its record from earlier, or None})."""
    resources.require_jobs_memory(Counter(job.kind for job in jobs), "run fewer jobs")
    checked: set = set()
    for job in jobs:
        job.check_memory(checked)
    out = Path(out)
    storage.check_writable_dir(out)
    for folder in (out, out / "jobs", out / "runs"):
        storage.remove_stale_temporaries(folder)
    return out, {job.name: prior_record(job_path(out, job.name), job) for job in jobs}


def _publish_run(out: Path, name: str, files: dict[str, bytes]) -> None:
    """A shipped run, into ``<out>/runs/<name>`` whole or not at all (the first complete copy wins)."""
    path = out / "runs" / name
    if path.exists():
        return
    tmp = storage.temporary_sibling(path)
    try:
        with storage.writing(path):
            unpack_directory(files, tmp)
        storage.publish_directory(tmp, path)
    finally:
        storage.remove(tmp)


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _summary(record: dict) -> str:
    """λ̂ of a finished job, in a few words, for its log line."""
    def llc(result):
        return "–" if result.get("llc_mean") is None else f"{result['llc_mean']:.1f}"
    if "result" in record:
        return f"λ̂ {llc(record['result'])}"
    if "results" in record:
        return f"λ̂ {llc(record['results'][0])} → {llc(record['results'][-1])} over {len(record['results'])} checkpoints"
    return f"{len(record.get('cells', []))} calibration cells"


class _Progress:
    """One bar on stderr: jobs done / total, training groups done, failures, ETA ("bar"); a line per training
    group and per job ("log"); or nothing."""

    def __init__(self, mode: str, total: int):
        self.mode, self.total, self.done, self.failed = mode, total, 0, 0
        self.groups, self.trained_groups = 0, 0
        self.bar = tqdm(total=total, desc="jobs", unit="job", disable=mode != "bar", file=sys.stderr)

    def training(self, groups: int) -> None:
        self.groups = groups
        self._postfix()

    def trained(self, configs: list[TrainConfig], outcome: str, seconds: float) -> None:
        self.trained_groups += 1
        if outcome == "ok" and self.mode == "log":
            seeds = ", ".join(str(c.seed) for c in configs)
            _log(f"[training {self.trained_groups}/{self.groups}] {configs[0].run_name().rsplit('-seed', 1)[0]}, "
                 f"seed{'s' * (len(configs) > 1)} {seeds} ({seconds:.0f} s)")
        self._postfix()

    def job(self, name: str, outcome: str, detail, seconds: float | None) -> None:
        """``detail``: the record, or the reason of a failure; ``outcome`` "found": another process's record."""
        self.done += 1
        self.failed += outcome == "failed"
        if outcome == "failed" and self.mode != "off":
            tqdm.write(f"job {name} failed: {detail}", file=sys.stderr)
        elif self.mode == "log":
            by = ", by another process" if outcome == "found" else ""
            _log(f"[{self.done}/{self.total}] {name}: {_summary(detail)} ({seconds:.0f} s{by})")
        self._postfix()
        self.bar.update()

    def _postfix(self) -> None:
        postfix = dict(training=f"{self.trained_groups}/{self.groups}") if self.trained_groups < self.groups else {}
        self.bar.set_postfix(postfix | (dict(failed=self.failed) if self.failed else {}), refresh=False)

    def close(self) -> None:
        self.bar.close()


def run_jobs(jobs: list, out: str | os.PathLike, *, executor: str = "local", workers: int | None = None,
             address: str | None = None, progress: bool | str = "auto", on_record: Callable | None = None,
             cpus_per_job: float = 1, gpus_per_job: float = 0.25, retries: int = DEFAULT_RETRIES) -> list[dict]:
    """Run every job whose JSON under ``<out>/jobs`` is missing; return all jobs' records in job order.

    ``jobs``: ``protocol.SweepJob`` objects: ``jobs.Job`` (a training run and its estimate) or
    ``spec.EstimateJob`` (a model factory, data and settings). ``executor``: "local" (this process, or
    ``workers`` processes) or "ray" (``address``, else $RAY_ADDRESS, "auto" joins a running cluster; none: a
    local Ray instance for this run, with ``workers`` CPUs if given, shut down after). ``progress``: True
    (a bar), "log" (a line per training group and per job on stderr), False, or "auto" (a bar on a
    terminal, log lines otherwise). ``on_record(name, outcome, detail)`` is called after each job ends ("ok"
    and its record, written already, or "failed" and the reason). Raises ``JobsFailed`` after the others ran
    if any job failed.
    """
    check_options(executor, workers, address)
    check_jobs(jobs, executor, workers)
    mode = progress_mode(progress)
    out, records = open_sweep(jobs, out)
    todo = [job for job in jobs if records[job.name] is None]
    if mode == "log" and len(todo) < len(jobs):
        where = " (ray)" if executor == "ray" else f" ({workers} worker processes)" if workers else ""
        _log(f"{len(jobs) - len(todo)} of {len(jobs)} jobs finished earlier in {out / 'jobs'}; running {len(todo)}{where}")
    failures: dict[str, str] = {}
    if todo:
        pool = open_pool(executor, workers, address, retries, cpus_per_job, quiet=mode == "off")
        progress = _Progress(mode, len(todo))
        try:
            _Sweep(pool, out, records, failures, progress, on_record, gpus_per_job).run(todo)
        finally:
            progress.close()
            pool.close()
    done = [records[job.name] for job in jobs if records[job.name] is not None]
    if failures:
        raise JobsFailed(failures, done, len(jobs))
    return done


def run_sweep(jobs: list, out: str | os.PathLike, progress: bool | str = "auto", *, executor: str = "local",
              workers: int | None = None, address: str | None = None) -> list[dict]:
    """``run_jobs`` with ``progress`` as its third argument, as earlier versions ran the study's sweeps."""
    return run_jobs(jobs, out, executor=executor, workers=workers, address=address, progress=progress)


class _Sweep:
    """One driver's jobs in flight: trains the runs the jobs need (the seeds of one configuration together),
    starts each job once its run is there, and publishes each record as it arrives."""

    def __init__(self, pool, out: Path, records: dict, failures: dict, progress: _Progress, on_record, gpus_per_job):
        self.pool, self.out, self.records, self.failures = pool, out, records, failures
        self.progress, self.on_record, self.gpus_per_job = progress, on_record, gpus_per_job
        self.root = str(out) if pool.shared else None  # None: the workers do not see the driver's files
        self.jobs: dict[str, object] = {}  # job name -> the job, until it ends
        self.waiting: dict[str, list] = {}  # run name -> the jobs that wait for that run to be trained
        self.groups: list[list[TrainConfig]] = []  # runs that differ only in their seed train together

    def run(self, todo: list) -> None:
        if not self.pool.shared:
            self.pool.require_gpus([job.name for job in todo if self.gpus(job) > 0])
        groups: dict[TrainConfig, list[TrainConfig]] = {}
        usable: dict[str, bool] = {}  # run name -> whether <out>/runs holds it whole
        for job in todo:
            self.jobs[job.name] = job
            name = job.training.run_name() if job.training is not None else None
            if name is not None and name not in usable:  # checked once; a damaged one is moved aside, retrained
                usable[name] = usable_run(job.training, self.out / "runs" / name) is not None
            if name is None or usable[name]:
                self.submit(job)
                continue
            if name not in self.waiting:
                groups.setdefault(replace(job.training, seed=0), []).append(job.training)
            self.waiting.setdefault(name, []).append(job)
        self.groups = list(groups.values())
        self.progress.training(len(self.groups))
        for number, configs in enumerate(self.groups):
            self.pool.submit(("train", number), train_task, (configs, self.root))
        while self.pool.busy():
            key, (outcome, value, seconds) = self.pool.next()
            if outcome == "stop":
                raise FastLLCError(value)
            if isinstance(key, tuple):
                self.trained(self.groups[key[1]], outcome, value, seconds)
            else:
                self.ended(key, outcome, value, seconds)

    def gpus(self, job) -> float:
        return self.gpus_per_job if str(job.device).startswith("cuda") else 0

    def submit(self, job) -> None:
        files = None
        if self.root is None and job.training is not None:  # the run travels to the worker
            name = job.training.run_name()
            files = self.pool.puts.get(name) or self.pool.put(name, pack_directory(self.out / "runs" / name))
        self.pool.submit(job.name, job_task, (job, self.root, files), self.gpus(job))

    def trained(self, configs: list[TrainConfig], outcome: str, value, seconds: float) -> None:
        """A training group ended: publish its runs (shipped from workers) and start its jobs."""
        if outcome == "ok" and self.root is None:
            for name, files in value.items():
                _publish_run(self.out, name, files)
        self.progress.trained(configs, outcome, seconds)
        for config in configs:
            for job in self.waiting.pop(config.run_name(), []):
                if outcome == "ok":
                    self.submit(job)
                else:
                    self.ended(job.name, "failed", f"training {config.run_name()} failed: {value}", None)

    def ended(self, name: str, outcome: str, value, seconds: float | None) -> None:
        """A job ended: publish its record (the one on disk wins) or note its failure, and say so."""
        job, path = self.jobs.pop(name), job_path(self.out, name)
        if outcome in ("ok", "found"):
            record = value if outcome == "found" else job.publish(path, value)
            mismatch = job.mismatch(record)  # another process's record, made with other settings
            if mismatch:
                outcome, value = "failed", _refusal(path, job, mismatch)
            else:
                self.records[name] = value = record
        if outcome == "failed":
            self.failures[name] = value
        self.progress.job(name, outcome, value, seconds)
        if self.on_record is not None:
            self.on_record(name, "failed" if outcome == "failed" else "ok", value)
