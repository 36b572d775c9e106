"""The one protocol every sweep job follows, and the job record that the jobs and the driver share.

``executors.run_jobs`` runs any object that has what ``SweepJob`` lists: the study's ``jobs.Job`` (a training
run and its estimate) and ``spec.EstimateJob`` (a model of one's own) both do. The driver asks nothing else of
a job and never asks what type it is. The arrows run one way: ``jobs``, ``spec`` and ``executors`` import this
module, this module imports none of them.

A job's record is one JSON file, ``<out>/jobs/<job name>.json``, written atomically and published once (the
first complete record wins when several processes finish a job); a damaged one is moved aside with a warning
and its job runs again.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Callable, Protocol

from .. import storage
from ..errors import FastLLCError
from ..llc import divergence_advice
from ..sampling import SGLDConfig, wbic_nbeta


class SweepJob(Protocol):
    """What the driver needs of a job.

    ``name`` names its JSON (``job_path``); ``kind`` ("final", "dynamics", "calibrate": the study's;
    "estimate": one's own model) counts it against memory; ``device`` ("cpu", "cuda", "cuda:N"): a CUDA job
    asks Ray for a share of a GPU. ``training``: the ``TrainConfig`` of the trained run the job needs in
    ``<out>/runs`` (None: it needs none); the driver trains the missing ones first (the seeds of one
    configuration together) and ships them to workers that do not share the sweep's directory.
    """

    name: str
    kind: str
    device: str
    training: object

    def check_memory(self, checked: set) -> None:
        """Refuse, before any work, a job that cannot fit; ``checked``: what this sweep checked already."""

    def run(self, out: Path) -> dict:
        """The job's record, computed in this process; ``out``: a sweep directory whose ``runs/`` holds the
        trained run the job needs."""

    def finished(self, path: Path) -> dict | None:
        """Its finished record at ``path``, or None to run it; a damaged one is moved aside with a warning."""

    def mismatch(self, record: dict) -> str | None:
        """Which of its settings ``record`` was made with differently (None: the same)."""

    def publish(self, path: Path, record: dict) -> dict:
        """Write ``record`` at ``path`` unless another process finished the job first: the record on disk wins."""


JOB_MEMBERS = ("name", "kind", "device", "training", "check_memory", "run", "finished", "mismatch", "publish")


def job_problem(job) -> str | None:
    """What ``job`` lacks of ``SweepJob`` (None: nothing)."""
    missing = [member for member in JOB_MEMBERS if not hasattr(job, member)]
    return f"it has no {', '.join(missing)}" if missing else None


def job_path(out: Path, name: str) -> Path:
    """Where a sweep directory keeps the record of job ``name``."""
    return Path(out) / "jobs" / f"{name}.json"


# ---- a job's record on disk ----

def write_json_atomically(path: Path, record: dict) -> None:
    storage.write_atomically(path, json.dumps(record, indent=1) + "\n")


def read_record(path: Path, check: Callable) -> tuple[dict | None, str | None]:
    """A job JSON's record, or None and what is wrong with it (missing file: None, None); ``check(record)``
    says what makes a record unusable."""
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as err:  # ValueError: truncated or empty JSON, bad UTF-8
        return None, f"unreadable: {err}" if str(err) else "unreadable"
    problem = check(record)
    return (None, problem) if problem else (record, None)


def finished_record(path: Path, check: Callable) -> dict | None:
    """The record of a finished job; None if there is none. A damaged JSON (``check`` finds a problem) is
    moved aside with a warning, so that the job runs again."""
    record, problem = read_record(path, check)
    if problem is None:
        return record
    aside = storage.move_aside(path)
    if aside is not None:
        warnings.warn(f"{path} is damaged ({problem}); moved it to {aside.name} and running its job again",
                      RuntimeWarning, stacklevel=2)
    return None


def publish_record(path: Path, record: dict, check: Callable) -> dict:
    """Write a job's JSON unless another process finished the job first; the record on disk wins."""
    if storage.publish_file_once(path, json.dumps(record, indent=1) + "\n"):
        return record
    existing = finished_record(path, check)
    if existing is None:  # it was damaged and is now moved aside: ours replaces it
        write_json_atomically(path, record)
        return record
    return existing


def _plain(value):
    return json.loads(json.dumps(value))


def settings_mismatch(record: dict, expected: dict, defaults: dict | None = None) -> str | None:
    """Which of the ``expected`` settings ({field: value or {name: value}}) the record was made with
    differently (None: the same). A setting a record of an older version lacks counts as its default from
    ``defaults`` (e.g. sgld.chain_loss "exact")."""
    defaults = defaults or {}
    for key, value in _plain(expected).items():
        there = _plain(record.get(key))  # as read back from its JSON
        if isinstance(value, dict) and isinstance(there, dict):
            default = _plain(defaults.get(key, {}))
            for name, now in value.items():
                if there.get(name, default.get(name)) != now:
                    return f"{key}.{name} {there.get(name)!r} there, {now!r} now"
        elif there != value:
            return f"{key} {there!r} there, {value!r} now"
    return None


# ---- a job with no λ̂ ----

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
