"""The study's sweep job: one trained run and its estimate, saved as one JSON file.

A sweep is a list of jobs, run by ``executors.run_jobs`` (``fastllc reproduce`` and ``fastllc sweep`` alike);
``Job`` follows ``protocol.SweepJob``. Results are written atomically (temporary file + rename) to
``<out>/jobs/<job name>.json``, and a job whose JSON exists is skipped, so an interrupted sweep loses at most
the jobs in flight. Trained runs live in ``<out>/runs/`` and are reused by every job that needs them. Any
number of processes may run sweeps into one directory at once: a run or a job finished first by one is
adopted by the others. A damaged job JSON (a crash or a full disk under an older version) is moved aside with
a warning and its job run again.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import resources
from ..analysis import analyse_run
from ..api import estimate_checkpoints, estimate_run
from ..errors import FastLLCError
from ..llc import estimate_llc
from ..sampling import SGLDConfig, wbic_nbeta
from ..sampling.contract import Samples
from ..tasks import train_size
from ..train import Run, TrainConfig, cached_run, train_together
from .protocol import (finished_record, publish_record, read_record, require_some_healthy, settings_mismatch,
                       write_json_atomically)


@dataclass(frozen=True)
class Job:
    """Train ``training`` (or reuse the run) and estimate λ̂ with ``sgld``: a ``protocol.SweepJob``.

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

    def run(self, out: Path) -> dict:
        """Its record: the run in ``<out>/runs`` (trained there if missing), estimated here."""
        return run_job(self, Path(out))

    def problem(self, record) -> str | None:
        """What makes ``record`` unusable as this job's finished record (None: nothing)."""
        problem = record_problem(record)
        if problem is None and record["job"] != self.name:
            problem = f"it is the record of another job, {record['job']!r}"
        return problem

    def finished(self, path: Path) -> dict | None:
        return finished_record(path, self.problem)

    def publish(self, path: Path, record: dict) -> dict:
        """The record names the run where the sweep keeps it (a worker may have estimated a copy of it)."""
        record = dict(record, run=str(Path(path).parents[1] / "runs" / self.training.run_name()))
        return publish_record(path, record, self.problem)

    def mismatch(self, record: dict) -> str | None:
        expected = dict(kind=self.kind, training=asdict(self.training), sgld=self.sgld.to_dict())
        return settings_mismatch(record, expected, dict(training=asdict(TrainConfig(p=2)), sgld=SGLDConfig().to_dict()))

    def check_memory(self, checked: set) -> None:
        """Its training, and its chains (``chains`` per checkpoint of a dynamics job, per cell of a calibration
        grid), against memory; ``checked``: the shapes this sweep checked already."""
        t, sgld = self.training, self.sgld
        batch = sgld.chains * {"dynamics": t.checkpoints + 1, "calibrate": len(self.tags.get("grid", [1]))}.get(self.kind, 1)
        if (t, batch, sgld.steps, sgld.batch_size) in checked:
            return
        checked.add((t, batch, sgld.steps, sgld.batch_size))
        resources.require_training_memory(t.p, t.embed, t.hidden)
        resources.require_sampling_memory(  # the one check the API and the commands make
            batch, sgld.steps, resources.mlp_parameters(t.p, t.embed, t.hidden),
            resources.mlp_minibatch_bytes(t.p, t.embed, t.hidden, sgld.batch_size), self.device,
            start_bytes=resources.mlp_start_bytes(t.p, t.embed, t.hidden, train_size(t.p, t.train_frac)),
            subject=f"job {self.name} ({batch:,} chains × {sgld.steps:,} steps)",
            names=("batch_size (the spec's [sgld] batch_size)",
                   "chains or steps (--chains, or the spec's [sgld] chains, steps)"))


BASELINE_STEPS = 5000  # the study's chain length: a job of another length says so in its name


def sgld_suffix(sgld: SGLDConfig) -> str:
    """The part of a job's name that tells its SGLD settings apart from those its sweep used before they
    could vary (plain SGLD, exact chain loss, orthogonal restriction on, 5000 steps): empty for those, so
    that job JSONs written then keep their names and are not run again."""
    parts = ([sgld.sampler_name] if sgld.sampler_name != "sgld" else []) + \
            (["published-loss"] if sgld.chain_loss == "published" else []) + \
            (["orth-off"] if not sgld.orthogonal else []) + \
            ([f"T{sgld.steps}"] if sgld.steps != BASELINE_STEPS else [])
    return "".join("-" + part for part in parts)


RESULT_KEYS = {"final": ("result",), "dynamics": ("steps", "metrics", "results"), "calibrate": ("cells",)}


def record_problem(record) -> str | None:
    """What makes ``record`` unusable as the record of a study job (None: nothing)."""
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


def load_records(out: str | os.PathLike, check=None) -> list[dict]:
    """Every valid job record under ``<out>/jobs``; a damaged or foreign JSON (or one for which ``check``,
    a function of a record, returns a problem) is skipped with a warning naming the file."""
    folder = Path(out) / "jobs"
    records = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        record, problem = read_record(path, record_problem)
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
    records = {path: read_record(path, record_problem)[0] for path in paths}
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
