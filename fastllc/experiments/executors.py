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
from ..train import TrainConfig, train_together
from .jobs import Job, finished_record, progress_mode, publish_record, run_job

EXECUTORS = ("local", "ray")
RAY_MISSING = "--executor ray needs Ray, an optional extra: pip install -e '.[ray]'"
DEFAULT_RETRIES = 3  # reruns of a job whose worker process died (not of a job that raised)


class JobsFailed(FastLLCError):
    """Some jobs failed (each reported in one line as it failed); the others' records are kept."""

    def __init__(self, failures: dict[str, str], records: list[dict], total: int):
        names = ", ".join(list(failures)[:3]) + (", ..." if len(failures) > 3 else "")
        super().__init__(f"{len(failures)} of {total} jobs failed ({names}); the others are saved: fix the "
                         "failed jobs' settings and rerun (finished jobs are skipped)")
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


def _run(job, root: str | None, run_files: dict[str, bytes] | None) -> dict:
    if not isinstance(job, Job):
        return job.run()
    if root is not None:
        return run_job(job, Path(root))
    with tempfile.TemporaryDirectory(prefix="fastllc-job-") as scratch:
        if run_files is not None:
            unpack_directory(run_files, Path(scratch) / "runs" / job.training.run_name())
        return run_job(job, Path(scratch))


# ---- pools: submit a task, take the next finished one ----

class InProcessPool:
    """Runs each task in this process when its result is asked for (run_sweep's order)."""

    shared = True

    def __init__(self):
        self.pending: list[tuple[object, Callable, tuple]] = []

    def submit(self, key, fn, args, gpus: float = 0) -> None:
        self.pending.append((key, fn, args))

    def busy(self) -> int:
        return len(self.pending)

    def next(self) -> tuple[object, tuple[str, object]]:
        key, fn, args = self.pending.pop(0)
        return key, fn(*args)

    def close(self) -> None:
        self.pending.clear()


class ProcessPool:
    """``workers`` spawned processes on this machine; a task whose process dies is resubmitted to a new
    pool, up to ``retries`` times (a dead worker breaks a ``ProcessPoolExecutor`` and every task in it)."""

    shared = True

    def __init__(self, workers: int, retries: int):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.context, self.workers, self.retries = multiprocessing.get_context("spawn"), workers, retries
        self.factory = ProcessPoolExecutor
        self.executor = self.factory(workers, mp_context=self.context)
        self.futures: dict = {}  # future -> (key, fn, args, attempt)
        self.given_up: list = []  # (key, outcome) of tasks whose process died more than ``retries`` times

    def submit(self, key, fn, args, gpus: float = 0, attempt: int = 0) -> None:
        self.futures[self.executor.submit(fn, *args)] = (key, fn, args, attempt)

    def busy(self) -> int:
        return len(self.futures) + len(self.given_up)

    def next(self):
        from concurrent.futures import FIRST_COMPLETED, wait
        from concurrent.futures.process import BrokenProcessPool

        while not self.given_up:
            done, _ = wait(list(self.futures), return_when=FIRST_COMPLETED)
            for future in done:
                if not isinstance(future.exception(), BrokenProcessPool):
                    key, *_ = self.futures.pop(future)
                    if future.exception() is not None:
                        return key, ("failed", f"{type(future.exception()).__name__}: {future.exception()}")
                    return key, future.result()
            # a worker died: every task still in the broken pool runs again in a fresh one
            lost = [self.futures.pop(f) for f in list(self.futures)
                    if not f.done() or isinstance(f.exception(), BrokenProcessPool)]
            self.executor.shutdown(wait=True, cancel_futures=True)  # its processes are gone already
            self.executor = self.factory(self.workers, mp_context=self.context)
            for key, fn, args, attempt in lost:
                if attempt < self.retries:
                    self.submit(key, fn, args, attempt=attempt + 1)
                else:
                    self.given_up.append((key, ("failed", f"its worker process died {attempt + 1} times (a script "
                                                          "that runs jobs in workers needs if __name__ == '__main__':)")))
        return self.given_up.pop(0)

    def close(self) -> None:
        if not self.futures:  # all done: let the processes exit on their own
            self.executor.shutdown(wait=True)
            return
        processes = list((getattr(self.executor, "_processes", None) or {}).values())
        self.executor.shutdown(wait=False, cancel_futures=True)
        for process in processes:  # an interrupted driver does not wait for the jobs in flight
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(timeout=10)


class RayPool:
    """One Ray task per job; Ray reruns a task whose worker died, up to ``retries`` times."""

    shared = False

    def __init__(self, address: str | None, workers: int | None, retries: int, cpus: float, quiet: bool):
        import logging

        try:
            import ray
        except ImportError:
            raise FastLLCError(RAY_MISSING) from None
        self.ray, self.retries, self.cpus, self.refs = ray, retries, cpus, {}
        self.started = not ray.is_initialized()
        if self.started:
            address = address or os.environ.get("RAY_ADDRESS") or None
            options = dict(logging_level=logging.ERROR if quiet else logging.WARNING, log_to_driver=not quiet)
            if address is None:  # a Ray instance of our own, for this run
                options.update(num_cpus=workers, include_dashboard=False)
            else:
                _check_reachable(address)
            try:
                ray.init(address=address, **options)
            except (ConnectionError, RuntimeError, ValueError) as err:
                raise FastLLCError(f"cannot join the Ray cluster at {address}: {str(err).splitlines()[0]} "
                                   "(start one with `ray start --head`, or give no --address for a local one)") from None
        self.remote = {}
        self.puts: dict[str, object] = {}

    def require_gpus(self, jobs: list, gpus_per_job: float) -> None:
        """A job on CUDA asks for a GPU share: refuse now, not hang, on a cluster without GPUs."""
        needing = [job.name for job in jobs if _gpus(job, gpus_per_job) > 0]
        if needing and not self.ray.cluster_resources().get("GPU", 0):
            raise FastLLCError(f"job {needing[0]} runs on CUDA, but the Ray cluster has no GPU; start its nodes "
                               "on GPU machines (ray start detects their GPUs), or run the job on the CPU")

    def put(self, name: str, files) -> object:
        """One object-store copy of a run's files per run, shared by every job that needs it."""
        if name not in self.puts:
            self.puts[name] = self.ray.put(files)
        return self.puts[name]

    def submit(self, key, fn, args, gpus: float = 0) -> None:
        if fn not in self.remote:
            self.remote[fn] = self.ray.remote(fn)
        task = self.remote[fn].options(num_cpus=self.cpus, num_gpus=gpus, max_retries=self.retries,
                                       retry_exceptions=False)
        self.refs[task.remote(*args)] = key

    def busy(self) -> int:
        return len(self.refs)

    def next(self):
        (ref,), _ = self.ray.wait(list(self.refs), num_returns=1)
        key = self.refs.pop(ref)
        try:
            return key, self.ray.get(ref)
        except self.ray.exceptions.RayError as err:  # a worker or node died more often than retries allow
            return key, ("failed", f"{type(err).__name__} after {self.retries} retries: "
                                   f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}")

    def close(self) -> None:
        for ref in list(self.refs):  # an interrupted driver: queued jobs never start, running ones are interrupted
            self.ray.cancel(ref)
        self.refs.clear()
        if self.started:
            self.ray.shutdown()


def _check_reachable(address: str, seconds: float = 10) -> None:
    """Refuse at once a host:port where nothing listens (ray.init would retry it for minutes)."""
    import socket

    host, _, port = address.rpartition(":")
    if address == "auto" or "://" in address or not host or not port.isdigit():
        return  # "auto" (ray finds the local cluster or says none runs), ray:// clients: Ray's own check
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=seconds).close()
    except OSError as err:
        raise FastLLCError(f"cannot join the Ray cluster at {address}: nothing answers there "
                           f"({(err.strerror or str(err)).lower()}); start its head with `ray start --head`, "
                           "or give no --address for a local Ray instance") from None


def open_pool(executor: str, workers: int | None, address: str | None, retries: int, cpus: float, quiet: bool):
    if executor == "ray":
        return RayPool(address, workers, retries, cpus, quiet)
    return ProcessPool(workers, retries) if workers else InProcessPool()


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
    """Which of the job's settings the finished record was made with differently (None: the same)."""
    expected = (dict(kind=job.kind, training=asdict(job.training), sgld=job.sgld.to_dict()) if isinstance(job, Job)
                else job.settings_record())
    for key, value in _plain(expected).items():
        if record.get(key) != value:
            if isinstance(value, dict) and isinstance(record.get(key), dict):
                diff = next(k for k in value if record[key].get(k) != value[k])
                return f"{key}.{diff} {record[key].get(diff)!r} there, {value[diff]!r} now"
            return f"{key} {record.get(key)!r} there, {value!r} now"
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
            _log(f"training {groups} group{'s' * (groups > 1)} of runs first (seeds of one configuration together)")

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
    out, mode = Path(out), progress_mode(progress)
    storage.check_writable_dir(out)  # before any work: a sweep that cannot save its results must not start
    for folder in (out, out / "jobs", out / "runs"):
        storage.remove_stale_temporaries(folder)  # of crashed processes
    paths = {job.name: out / "jobs" / f"{job.name}.json" for job in jobs}
    records = {job.name: finished(paths[job.name], job) for job in jobs}
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
        pool.require_gpus(todo, gpus_per_job)
    by_name = {job.name: job for job in todo}
    waiting: dict[str, list[Job]] = {}  # run name -> the jobs that wait for that run to be trained
    groups: dict[TrainConfig, list[TrainConfig]] = {}  # runs that differ only in their seed train together
    for job in todo:
        if not isinstance(job, Job):
            pool.submit(job.name, job_task, (job, root, None), _gpus(job, gpus_per_job))
            continue
        name = job.training.run_name()
        if _holds_files(out / "runs" / name):
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


def _holds_files(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


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
