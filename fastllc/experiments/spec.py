"""Sweeps of your own: a spec file (TOML) that becomes a list of jobs, and estimate jobs built in Python.

A spec file (examples/sweep_small.toml):

    name = "small"             # recorded in every job's JSON ("spec")
    kind = "final"             # "final": λ̂ at the trained weights; "dynamics": at every checkpoint
    report = "psweep"          # the layout of `fastllc report`: psweep, architectures, memorization, dynamics
    [training]                 # TrainConfig fields; task, p, seeds, embed, hidden, batches may be lists:
    task = "add"               #   every combination is one training run
    p = [5, 7]
    seeds = [0, 1]             # or a count: seeds = 3 means 0, 1, 2
    batches = 300
    [sgld]                     # SGLDConfig fields (one value each: these settings apply to every job)
    chains = 4
    steps = 200

Every key is checked before any work: a bad one is a one-line error naming the file and the key.

``EstimateJob``: λ̂ of any model: a model factory, a data factory and SGLD settings. The factories must be
module-level functions (pickled by reference) so that a job can run in another process or on another
machine, where the module must be importable too (an installed package, or Ray's ``runtime_env``).
``executors.run_jobs`` runs these like sweep jobs (both follow ``protocol.SweepJob``); their JSONs (kind "estimate") are not part of
``fastllc report``, which reads the study's kinds.
"""

from __future__ import annotations

import itertools
import math
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch.nn.functional as F

from .. import resources
from ..errors import FastLLCError
from ..sampling import SGLDConfig
from ..train import TrainConfig
from .jobs import Job
from .protocol import finished_record, publish_record, require_some_healthy, settings_mismatch

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

LAYOUTS = {"final": ("psweep", "architectures", "memorization"), "dynamics": ("dynamics",)}
TOP_KEYS = ("name", "kind", "report", "backend", "device", "training", "sgld")
GRID_KEYS = ("task", "p", "seeds", "embed", "hidden", "batches")  # lists: one run per combination
TRAINING_KEYS = GRID_KEYS + tuple(f.name for f in fields(TrainConfig) if f.name not in ("p", "task", "seed",
                                                                                          "embed", "hidden", "batches"))
SGLD_KEYS = tuple(f.name for f in fields(SGLDConfig))


def _kind_of(default) -> str:
    """What a setting's value must be, from its default: "int", "number", "bool", "str" or "number?"."""
    if isinstance(default, bool):
        return "bool"
    if isinstance(default, int):
        return "int"
    if isinstance(default, float):
        return "number"
    if isinstance(default, str):
        return "str"
    return "number?"  # None by default: a number, or absent


def _type_ok(value, kind: str) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind in ("number", "number?"):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, str)


_NAMES = {"int": "a whole number", "number": "a number", "number?": "a number", "bool": "true or false",
          "str": "a string"}
# p has no default; batches' None stands for the p's default length: each is a whole number when given
_TRAIN_KINDS = {f.name: _kind_of(f.default) for f in fields(TrainConfig)} | {"p": "int", "seeds": "int", "batches": "int"}
_SGLD_KINDS = {f.name: _kind_of(f.default) for f in fields(SGLDConfig)}


class _Spec:
    """Reads one spec file's tables, naming the file and the key in every error."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise FastLLCError(f"sweep spec {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as err:
            raise FastLLCError(f"cannot read sweep spec {path}: {err}") from None
        except tomllib.TOMLDecodeError as err:
            raise FastLLCError(f"{path} is not valid TOML: {err}") from None

    def error(self, key: str, what: str) -> FastLLCError:
        return FastLLCError(f"{self.path}: {key} {what}")

    def table(self, name: str, known: tuple[str, ...]) -> dict:
        table = self.data.get(name, {})
        if not isinstance(table, dict):
            raise self.error(name, "must be a table ([" + name + "])")
        for key in table:
            if key not in known:
                raise self.error(f"{name}.{key}", f"is not a setting; known: {', '.join(known)}")
        return table

    def value(self, key: str, value, kind: str, allow_list: bool = False) -> list:
        """``value`` as a list of values of ``kind`` (a scalar, or a non-empty list of distinct ones)."""
        values = value if isinstance(value, list) and allow_list else [value]
        if not values:
            raise self.error(key, "is an empty list; give at least one value")
        for item in values:
            if not _type_ok(item, kind):
                plural = " or a list of them" if allow_list else ""
                raise self.error(key, f"must be {_NAMES[kind]}{plural}, got {item!r}")
        repeated = [v for v in values if values.count(v) > 1]
        if repeated:
            raise self.error(key, f"lists {repeated[0]!r} twice")
        return values


def load_spec(path: str | Path) -> list[Job]:
    """The jobs of a sweep spec file: one per combination of the [training] lists (see the module doc)."""
    spec = _Spec(Path(path))
    for key in spec.data:
        if key not in TOP_KEYS:
            raise spec.error(key, f"is not a setting; known: {', '.join(TOP_KEYS)}")
    top = {key: spec.value(key, spec.data[key], "str")[0] for key in ("name", "kind", "report", "backend", "device")
           if key in spec.data}
    kind = top.get("kind", "final")
    if kind not in LAYOUTS:
        raise spec.error("kind", f"must be one of {', '.join(LAYOUTS)}, got {kind!r}")
    layout = top.get("report", LAYOUTS[kind][0])
    if layout not in LAYOUTS[kind]:
        raise spec.error("report", f"must be one of {', '.join(LAYOUTS[kind])} for kind {kind!r}, got {layout!r}")
    sgld = _sgld(spec)
    training = spec.table("training", TRAINING_KEYS)
    if "p" not in training:
        raise spec.error("training.p", "is missing: give the modulus, or a list of them")
    grid, fixed = {}, {}
    for key, value in training.items():
        if key != "seeds":
            values = spec.value(f"training.{key}", value, _TRAIN_KINDS[key], key in GRID_KEYS)
            (grid if key in GRID_KEYS else fixed)[key] = values if key in GRID_KEYS else values[0]
    seeds = _seeds(spec, training.get("seeds", [0]), kind, math.prod(len(values) for values in grid.values()))
    options = _executor_options(spec, top)
    tags = dict(spec=top.get("name", spec.path.stem), published=None)
    jobs = []
    for combination in itertools.product(*grid.values()):
        for seed in seeds:
            config = TrainConfig(**dict(zip(grid, combination)), **fixed, seed=seed)
            try:
                config.validate()
            except FastLLCError as err:
                raise spec.error("[training]", f"gives an invalid run ({config.run_name()}): {err}") from None
            jobs.append(Job(layout, config, sgld, kind=kind, tags=dict(tags), **options))
    return jobs


def _seeds(spec: _Spec, value, kind: str, runs_per_seed: int) -> list[int]:
    """seeds = [0, 3] (those seeds) or seeds = 2 (a count: 0 and 1). A count is checked against memory
    before its list is made: the sweep holds a job per seed and grid point (``resources.JOB_BYTES``)."""
    seeds = spec.value("training.seeds", value, "int", allow_list=True)
    if isinstance(value, list):
        return seeds
    if seeds[0] < 1:
        raise spec.error("training.seeds", f"must be a count of at least 1 or a list of seeds, got {seeds[0]}")
    try:
        resources.require_jobs_memory({kind: seeds[0] * runs_per_seed}, "use a smaller count")
    except FastLLCError as err:
        raise spec.error("training.seeds", f"= {seeds[0]:,}: {err}") from None
    return list(range(seeds[0]))


def _sgld(spec: _Spec) -> SGLDConfig:
    table = spec.table("sgld", SGLD_KEYS)
    settings = {key: spec.value(f"sgld.{key}", value, _SGLD_KINDS[key])[0] for key, value in table.items()}
    try:
        return SGLDConfig(**settings).validate()
    except FastLLCError as err:
        raise spec.error("[sgld]", f"is invalid: {err}") from None


def _executor_options(spec: _Spec, top: dict) -> dict:
    """backend and device of every job (``jobs.Job.backend``/``device``), checked."""
    from ..backends import names

    backend, device = top.get("backend", "auto"), top.get("device", "cpu")
    if backend != "auto" and backend not in names():
        raise spec.error("backend", f"must be auto or one of {', '.join(names())}, got {backend!r}")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise spec.error("device", f"must be cpu, cuda or cuda:N, got {device!r}")
    return dict(backend=backend, device=device)


# ---- estimate jobs of your own ----

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class EstimateJob:
    """λ̂ of ``model()`` at its weights on ``data()`` (``(inputs, targets)`` or a DataLoader), with ``sgld``.

    ``model`` and ``data`` are module-level functions (or ``functools.partial`` of them), called on the
    worker; ``loss_fn`` likewise. ``name`` names the JSON, ``<out>/jobs/<name>.json``; ``tags`` are extra
    fields for it. ``backend``/``device`` as in ``fastllc.estimate`` (a CUDA job asks Ray for a fraction of a
    GPU: ``run_jobs(gpus_per_job=...)``).
    """

    name: str
    model: Callable
    data: Callable
    sgld: SGLDConfig = field(default_factory=SGLDConfig)
    loss_fn: Callable = F.cross_entropy
    backend: str = "auto"
    device: str = "cpu"
    sweep: str = "estimates"
    tags: dict = field(default_factory=dict)
    kind = "estimate"
    training = None  # it needs no trained run (``protocol.SweepJob``)

    def __post_init__(self):
        if not isinstance(self.name, str) or not _SAFE_NAME.fullmatch(self.name):
            raise FastLLCError(f"job name {self.name!r} must be letters, digits, '.', '_' or '-' (it names a file)")
        for what in ("model", "data", "loss_fn"):
            if not callable(getattr(self, what)):
                raise FastLLCError(f"job {self.name}: {what} must be a function, got {getattr(self, what)!r}")
        self.sgld.validate()

    def settings_record(self) -> dict:
        return dict(kind=self.kind, sgld=self.sgld.to_dict(), backend=self.backend, device=self.device)

    def run(self, out=None) -> dict:
        """Its record, estimated in this process (``out``: unused, it needs no trained run)."""
        from ..api import estimate

        data = self.data()
        result = estimate(self.model(), data, self.loss_fn, self.sgld, backend=self.backend, device=self.device)
        record = dict(job=self.name, sweep=self.sweep, **self.settings_record(), result=result.to_dict(), **self.tags)
        require_some_healthy(record, self.sgld, len(data.dataset) if hasattr(data, "dataset") else len(data[1]))
        return record

    def problem(self, record) -> str | None:
        """What makes ``record`` unusable as this job's finished record (None: nothing)."""
        return _estimate_problem(record, self.name)

    def finished(self, path: Path) -> dict | None:
        """Its finished record, or None; a damaged JSON is moved aside with a warning."""
        return finished_record(path, self.problem)

    def publish(self, path: Path, record: dict) -> dict:
        """Write the record unless another process finished the job first (the record on disk wins)."""
        return publish_record(path, record, self.problem)

    def mismatch(self, record: dict) -> str | None:
        """Which of its settings ``record`` was made with differently (None: the same)."""
        return settings_mismatch(record, self.settings_record())

    def check_memory(self, checked: set) -> None:
        """Nothing to check before the sweep: its model is known only on its worker."""


def _estimate_problem(record, name: str) -> str | None:
    if not isinstance(record, dict):
        return "not a JSON object"
    if record.get("job") != name:
        return f"it is the record of another job, {record.get('job')!r}"
    if not (isinstance(record.get("result"), dict) and "llc_mean" in record["result"]):
        return "no result.llc_mean"
    return None
