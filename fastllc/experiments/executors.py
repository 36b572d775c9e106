"""Run a sweep's jobs in this process, in local worker processes, or as Ray tasks on a cluster.

``run_jobs(jobs, out, executor=...)`` is one driver for every executor:

- ``"local"`` (default, no extra dependency): in this process, exactly as ``jobs.run_sweep`` runs a sweep;
  with ``workers=N``, in N processes (``concurrent.futures``, spawn) on this machine. Local workers share
  ``out`` with the driver: each trains a missing run into ``<out>/runs`` (``train_together``, adopting a
  run another process finished first) and estimates there.
- ``"ray"``: one Ray core task per job (``num_cpus``, and a fractional ``num_gpus`` for a job on CUDA, so
  several small jobs share a GPU), retried by Ray when its worker dies (``max_retries``).

No shared filesystem is needed with Ray. A training run that several jobs need (its seeds, its checkpoints)
is trained ONCE, by one task per group of runs that differ only in their seed, and SHIPPED: the task returns
the run directory as ``{relative path: bytes}``; the driver publishes it under ``<out>/runs`` and puts it
once into Ray's object store, from which every estimate task that needs it fetches it (once per node) and
unpacks it into a private scratch directory. Runs already in ``<out>/runs`` are shipped from there. So
every executor estimates on the same run files with the same ``jobs.run_job``: the numbers are
bit-identical (tests/test_executors.py). Nothing is recomputed on the workers.

The driver writes each job's JSON atomically as its record arrives (``jobs.publish_record``); a job whose
JSON exists is skipped, so an interrupted driver loses at most the jobs in flight. A job that fails for a
reason of its own (a ``FastLLCError``: bad settings) is reported in one line and the others go on; at the
end ``JobsFailed`` (a ``FastLLCError``) lists the failed jobs. A finished JSON whose settings differ from
its job's is refused before any work (its numbers would silently stand for other settings).
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from .. import storage
from ..errors import FastLLCError
from ..sampling import SGLDConfig
from ..sampling.threads import single_threaded_torch
from ..train import TrainConfig, train_together, usable_run
from .jobs import Job, finished_record, open_sweep, progress_mode, publish_record, run_job
from .pools import RAY_MISSING, open_pool

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


def _outcome(work: Callable, *args) -> tuple[str, object]:
    """("ok", what ``work`` returned) or ("failed", a one-line reason): a job's own failure must not end
    the sweep. A FastLLCError says it all; any other exception's type says where to look."""
    try:
        return "ok", work(*args)
    except FastLLCError as err:
        return "failed", str(err)
    except Exception as err:
        return "failed", (f"{type(err).__name__}: {err}".splitlines() or [""])[0]


def train_task(configs: list[TrainConfig], root: str | None) -> tuple[str, object]:
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


def job_task(job, root: str | None, run_files: dict[str, bytes] | None) -> tuple[str, object]:
    """("ok", the job's record) or ("failed", a one-line reason). ``root``: the shared sweep directory;
    None: a scratch directory into which ``run_files`` (the job's training run, packed) are unpacked."""
    return _outcome(_run, job, root, run_files)


@single_threaded_torch()
def _run(job, root: str | None, run_files: dict[str, bytes] | None) -> dict:
    """One job, with torch's intra-op threads at 1 wherever it runs: the numbers must not depend on the
    worker's thread count (L_n(w*) and its gradient differ in the last bits between 1 and 2 threads, seen
    at p = 11), and sampling runs its own single-threaded chain groups anyway (sampling/threads.py)."""
    if not isinstance(job, Job):
        return job.run()
    if root is not None:
        return run_job(job, Path(root))
    with tempfile.TemporaryDirectory(prefix="fastllc-job-") as scratch:
        if run_files is not None:
            unpack_directory(run_files, Path(scratch) / "runs" / job.training.run_name())
        return run_job(job, Path(scratch))


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
    """Distinct, file-safe names; picklable jobs where they travel to other processes."""
    seen = set()
    for job in jobs:
        if not (isinstance(job, Job) or callable(getattr(job, "run", None))):
            raise FastLLCError(f"{job!r} is not a job: give jobs.Job or spec.EstimateJob objects")
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


def _plain(value):
    return json.loads(json.dumps(value))


def settings_mismatch(record: dict, job) -> str | None:
    """Which of the job's settings the finished record was made with differently (None: the same). A
    setting a record of an older version lacks counts as its default (e.g. sgld.chain_loss "exact")."""
    if isinstance(job, Job):
        expected = dict(kind=job.kind, training=asdict(job.training), sgld=job.sgld.to_dict())
        defaults = dict(training=asdict(TrainConfig(p=2)), sgld=SGLDConfig().to_dict())
    else:
        expected, defaults = job.settings_record(), {}
    for key, value in _plain(expected).items():
        there = record.get(key)
        if isinstance(value, dict) and isinstance(there, dict):
            default = _plain(defaults.get(key, {}))
            for name, now in value.items():
                if there.get(name, default.get(name)) != now:
                    return f"{key}.{name} {there.get(name)!r} there, {now!r} now"
        elif there != value:
            return f"{key} {there!r} there, {value!r} now"
    return None


def finished(path: Path, job) -> dict | None:
    """The job's finished record, None to run it (a damaged JSON is moved aside with a warning); a record
    made with other settings is an error."""
    if isinstance(job, Job):
        record = finished_record(path, job)
    else:
        record = job.finished(path)
    if record is not None:
        mismatch = settings_mismatch(record, job)
        if mismatch:
            raise FastLLCError(f"{path} holds job {job.name} with other settings ({mismatch}); give another "
                               "--out, or remove that file to run the job again")
    return record


def _gpus(job, gpus_per_job: float) -> float:
    device = str(getattr(job, "device", None) or (job.tags.get("device") if isinstance(job, Job) else "cpu"))
    return gpus_per_job if device.startswith("cuda") else 0


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


class _Progress:
    """One bar on stderr: jobs done / total, failures, ETA ("bar"), a line per job ("log"), or nothing."""

    def __init__(self, mode: str, total: int, skipped: int, out: Path, executor: str):
        self.mode, self.total, self.done, self.failed = mode, total, 0, 0
        self.start = time.perf_counter()
        if mode == "log" and skipped:
            _log(f"{skipped} of {skipped + total} jobs finished earlier in {out / 'jobs'}; running {total} ({executor})")
        self.bar = tqdm(total=total, desc="jobs", unit="job", disable=mode != "bar", file=sys.stderr)

    def training(self, groups: int) -> None:
        if groups and self.mode == "log":
            _log(f"training {groups} group{'s' * (groups > 1)} of runs (the seeds of a configuration together); "
                 "their jobs start as each group ends")

    def record(self, name: str, outcome: str, detail) -> None:
        self.done += 1
        self.failed += outcome != "ok"
        if outcome != "ok" and self.mode != "off":
            tqdm.write(f"job {name} failed: {detail}", file=sys.stderr)
        elif self.mode == "log":
            _log(f"[{self.done}/{self.total}] {name} ({time.perf_counter() - self.start:.0f} s)")
        if self.failed:
            self.bar.set_postfix(failed=self.failed, refresh=False)
        self.bar.update()

    def close(self) -> None:
        self.bar.close()


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_jobs(jobs: list, out: str | os.PathLike, *, executor: str = "local", workers: int | None = None,
             address: str | None = None, progress: bool | str = "auto", on_record: Callable | None = None,
             cpus_per_job: float = 1, gpus_per_job: float = 0.25, retries: int = DEFAULT_RETRIES) -> list[dict]:
    """Run every job whose JSON under ``<out>/jobs`` is missing; return all jobs' records in job order.

    ``jobs``: ``jobs.Job`` (a training run and its estimate) or ``spec.EstimateJob`` (a model factory, data
    and settings). ``executor``: "local" (this process, or ``workers`` processes) or "ray" (``address``,
    else $RAY_ADDRESS, "auto" joins a running cluster; none: a local Ray instance for this run, with
    ``workers`` CPUs if given, shut down after). ``progress``: True (a bar), "log", False, or "auto".
    ``on_record(name, outcome, detail)`` is called after each job ends ("ok" and its record, written
    already, or "failed" and the reason). Raises ``JobsFailed`` after the others ran if any job failed.
    """
    check_options(executor, workers, address)
    check_jobs(jobs, executor, workers)
    mode = progress_mode(progress)
    out, paths, records = open_sweep(jobs, out, finished)
    todo = [job for job in jobs if records[job.name] is None]
    failures: dict[str, str] = {}
    if todo:
        pool = open_pool(executor, workers, address, retries, cpus_per_job, quiet=mode == "off")
        try:
            _drive(pool, todo, out, paths, records, failures, _Progress(mode, len(todo), len(jobs) - len(todo), out, executor),
                   on_record, gpus_per_job)
        finally:
            pool.close()
    done = [records[job.name] for job in jobs if records[job.name] is not None]
    if failures:
        raise JobsFailed(failures, done, len(jobs))
    return done


def _drive(pool, todo, out, paths, records, failures, bar, on_record, gpus_per_job) -> None:
    root = str(out) if pool.shared else None
    if not pool.shared:
        pool.require_gpus([job.name for job in todo if _gpus(job, gpus_per_job) > 0])
    by_name = {job.name: job for job in todo}
    waiting: dict[str, list[Job]] = {}  # run name -> the jobs that wait for that run to be trained
    groups: dict[TrainConfig, list[TrainConfig]] = {}  # runs that differ only in their seed train together
    usable: dict[str, bool] = {}  # run name -> whether <out>/runs holds it whole
    for job in todo:
        if not isinstance(job, Job):
            pool.submit(job.name, job_task, (job, root, None), _gpus(job, gpus_per_job))
            continue
        name = job.training.run_name()
        if name not in usable:  # checked once per run; a damaged one is moved aside and trained again
            usable[name] = usable_run(job.training, out / "runs" / name) is not None
        if usable[name]:
            _submit_job(pool, job, root, out, gpus_per_job)
            continue
        if name not in waiting:
            groups.setdefault(replace(job.training, seed=0), []).append(job.training)
        waiting.setdefault(name, []).append(job)
    groups = list(groups.values())
    bar.training(len(groups))
    for number, configs in enumerate(groups):
        pool.submit(("train", number), train_task, (configs, root))

    def ended(name: str, outcome: str, value) -> None:
        if outcome == "ok":
            job = by_name[name]
            value = _localised(value, job, out, root)
            records[name] = publish_record(paths[name], value) if isinstance(job, Job) else job.publish(paths[name], value)
        else:
            failures[name] = value
        bar.record(name, outcome, value)
        if on_record is not None:
            on_record(name, outcome, records[name] if outcome == "ok" else value)

    try:
        while pool.busy():
            key, (outcome, value) = pool.next()
            if not isinstance(key, tuple):
                ended(key, outcome, value)
                continue
            if outcome == "ok" and root is None:  # a training group ended: publish its runs, start its jobs
                for name, files in value.items():
                    _publish_run(out, name, files)
            for config in groups[key[1]]:
                for job in waiting.pop(config.run_name(), []):
                    if outcome == "ok":
                        _submit_job(pool, job, root, out, gpus_per_job)
                    else:
                        ended(job.name, "failed", f"training {config.run_name()} failed: {value}")
    finally:
        bar.close()


def _submit_job(pool, job: Job, root, out: Path, gpus_per_job: float) -> None:
    files = None
    if root is None:
        name = job.training.run_name()
        files = pool.puts.get(name) or pool.put(name, pack_directory(out / "runs" / name))
    pool.submit(job.name, job_task, (job, root, files), _gpus(job, gpus_per_job))


def _localised(record: dict, job, out: Path, root) -> dict:
    """A record made in a worker's scratch directory names the run where the driver keeps it."""
    if isinstance(job, Job) and root is None:
        record = dict(record, run=str(out / "runs" / job.training.run_name()))
    return record
