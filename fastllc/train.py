"""Training the study's MLP and the run directory it leaves behind.

A run directory holds
    config.json        the TrainConfig, plus n_train and the checkpoint steps
    checkpoints/       step_XXXXX.pt state dicts (loaded with weights_only=True), checkpoint 0 = init
    metrics.jsonl      one line per checkpoint: step, train/test loss and accuracy
A run is written to a temporary sibling directory and renamed into place when complete, so a run
directory that exists is always whole; when several processes train the same run at once, the first
complete directory wins and the others adopt it (``storage.publish_directory``). ``Run.load`` checks
every file before anything expensive runs on a run.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import re
import shlex
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import resources, storage
from .errors import FastLLCError
from .machine import PORTABLE_ENVIRONMENT, in_portable_environment, machine_record
from .model import ModularMLP
from .sampling.threads import single_threaded_torch
from .seeding import check_seed, derive_seed, generator
from .model import scale_input_weights
from .validate import check_int
from .tasks import SPLITS, TASK_KINDS, Task, make_task, split_seed


def default_batches(p: int) -> int:
    """fastllc's default training length (``TrainConfig(batches=None)`` and ``fastllc train`` without
    --batches): 10,000 batches, 15,000 for p >= 41. (The study's p-sweep used 15,000 only at p = 41 and 53,
    10,000 at p = 47: ``experiments.sweeps.psweep_batches``.)"""
    return 15_000 if p >= 41 else 10_000


@dataclass(frozen=True)
class TrainConfig:
    p: int
    task: str = "add"
    embed: int = 8
    hidden: int = 32
    batches: int | None = None  # None: default_batches(p), resolved when the config is made (a number from then on)
    checkpoints: int = 25
    seed: int = 0
    lr: float = 0.01
    weight_decay: float = 2e-4
    batch_size: int = 64
    train_frac: float = 0.8
    init_scale: float = 1.0  # the embedding and both first-layer weights ×init_scale at initialisation
    split: str = "per-seed"  # "per-seed": task and split keyed by ``seed``; "fixed": those of seed 0 for all seeds
    portable: bool = False  # train with PyTorch's non-vector kernels: the same bits on any x86-64 CPU (machine.py)

    def __post_init__(self):
        """``batches=None`` becomes ``default_batches(p)`` here, once: the config, its run name and the saved
        config.json hold the number, so a run trained with that number given explicitly is the same run.
        (``replace(config, p=...)`` keeps the number; pass ``batches=None`` to take the new p's default.)"""
        if self.batches is None and _is_integer(self.p):  # a bad p is left for validate() to name
            object.__setattr__(self, "batches", default_batches(self.p))

    def validate(self) -> "TrainConfig":
        for name in _INTEGER_FIELDS:
            if not _is_integer(getattr(self, name)):
                raise FastLLCError(f"{name} must be an integer, got {getattr(self, name)!r}")
        for name in _REAL_FIELDS:
            if not _is_number(getattr(self, name)) or not math.isfinite(getattr(self, name)):
                raise FastLLCError(f"{name} must be a finite number, got {getattr(self, name)!r}")
        if not isinstance(self.portable, bool):
            raise FastLLCError(f"portable must be true or false, got {self.portable!r}")
        for name in ("task", "split"):
            if not isinstance(getattr(self, name), str):
                raise FastLLCError(f"{name} must be a string, got {getattr(self, name)!r}")
        if self.p < 2:
            raise FastLLCError(f"p must be at least 2, got {self.p}")
        if self.task not in TASK_KINDS:
            raise FastLLCError(f"unknown task {self.task!r}; choose one of {', '.join(TASK_KINDS)}")
        for name in ("embed", "hidden", "batches", "checkpoints", "batch_size"):
            if getattr(self, name) < 1:
                raise FastLLCError(f"{name} must be at least 1, got {getattr(self, name)}")
        check_seed(self.seed)
        if not (self.lr > 0 and self.weight_decay >= 0):
            raise FastLLCError("learning rate must be > 0 and weight decay >= 0")
        if not 0.0 < self.train_frac <= 1.0:
            raise FastLLCError(f"train_frac must be in (0, 1], got {self.train_frac}")
        if not self.init_scale > 0:
            raise FastLLCError(f"init_scale must be > 0, got {self.init_scale}")
        if self.split not in SPLITS:
            raise FastLLCError(f"unknown split {self.split!r}; choose one of {', '.join(SPLITS)}")
        return self

    def make_task(self) -> Task:
        """The task table and train split: keyed by ``seed``, or by seed 0 for every seed (split "fixed")."""
        return make_task(self.p, self.task, split_seed(self.seed, self.split), self.train_frac)

    def new_model(self) -> ModularMLP:
        """The model at initialisation: PyTorch's default init, seeded by (seed, "init"), with the embedding
        and first-layer weights ×``init_scale`` (1: untouched)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, "init"))
            model = ModularMLP(self.p, self.embed, self.hidden)
        if self.init_scale != 1:
            scale_input_weights(model, self.init_scale)
        return model

    def run_name(self) -> str:
        """The run's directory name. Settings added later appear only when they differ from their default,
        so a run trained before they existed keeps its name (and its cache)."""
        extra = ((f"-init{self.init_scale:g}" if self.init_scale != 1 else "") + ("-fixedsplit" if self.split == "fixed" else "")
                 + ("-portable" if self.portable else ""))
        return (f"{self.task}-p{self.p}-e{self.embed}-h{self.hidden}-b{self.batches}-k{self.checkpoints}{extra}"
                f"-seed{self.seed}")


_INTEGER_FIELDS = ("p", "embed", "hidden", "batches", "checkpoints", "seed", "batch_size")
_REAL_FIELDS = ("lr", "weight_decay", "train_frac", "init_scale")
# fields added after runs were first written: a config.json without them has their defaults
LATER_FIELDS = {"init_scale": 1.0, "split": "per-seed", "portable": False}


def _is_integer(value) -> bool:
    """A Python int and not a bool: what JSON writes back as the same integer."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def checkpoint_steps(batches: int, checkpoints: int) -> list[int]:
    """K evenly spaced checkpoints (0 = initialisation) plus the final weights: K + 1 steps."""
    return sorted({k * batches // checkpoints for k in range(checkpoints)} | {batches})


@torch.no_grad()
def evaluate(model: torch.nn.Module, pairs: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over all given examples."""
    if labels.numel() == 0:
        return math.nan, math.nan
    logits = model(pairs)
    return F.cross_entropy(logits, labels).item(), (logits.argmax(-1) == labels).float().mean().item()


def _metrics(step: int, model: torch.nn.Module, task: Task) -> dict:
    train_loss, train_acc = evaluate(model, *task.train_data())
    test_loss, test_acc = evaluate(model, *task.test_data())
    return dict(step=step, train_loss=train_loss, train_acc=train_acc, test_loss=test_loss, test_acc=test_acc)


class _RunWriter:
    """Writes one run into a temporary sibling of ``out`` and renames it into place when complete."""

    def __init__(self, config: TrainConfig, task: Task, out: Path, adopt: bool):
        if not adopt and _holds_files(out):
            raise FastLLCError(f"{out} already exists and is not empty; choose another output directory")
        storage.check_writable_dir(out)
        self.config, self.task, self.out = config, task, out
        self.tmp = storage.temporary_sibling(out)
        self.metrics: list[dict] = []
        with storage.writing(out):
            out.parent.mkdir(parents=True, exist_ok=True)
            storage.remove_stale_temporaries(out.parent)  # of crashed processes: they never finish
            (self.tmp / "checkpoints").mkdir(parents=True)

    def checkpoint(self, step: int, model: torch.nn.Module) -> None:
        buffer = io.BytesIO()  # serialised in memory, so that a full disk is an OSError of our own write
        torch.save(model.state_dict(), buffer)
        with storage.writing(self.out):
            storage.write_new_file(self.tmp / "checkpoints" / f"step_{step:05d}.pt", buffer.getvalue())
        self.metrics.append(_metrics(step, model, self.task))

    def finish(self, steps: list[int]) -> "Run":
        """Publish the run; if another process published the same run first, adopt that one."""
        record = dict(asdict(self.config), n_train=self.task.n_train, checkpoint_steps=steps, machine=machine_record())
        with storage.writing(self.out):
            storage.write_new_file(self.tmp / "config.json", (json.dumps(record, indent=2) + "\n").encode())
            storage.write_new_file(self.tmp / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in self.metrics).encode())
        if storage.publish_directory(self.tmp, self.out):
            return Run.load(self.out)
        return _adopted(self.config, self.out)  # another process finished first

    def discard(self) -> None:
        storage.remove(self.tmp)


def _holds_files(path: Path) -> bool:
    """Whether ``path`` exists and is something other than an empty directory."""
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


class _Adam:
    """torch.optim.Adam (coupled L2 weight decay, β = (0.9, 0.999), eps 1e-8) on one flat buffer of
    weights, so that all runs of a batch update in a handful of whole-buffer operations."""

    def __init__(self, weights: torch.Tensor, lr: float, weight_decay: float):
        self.w, self.lr, self.weight_decay, self.t = weights, lr, weight_decay, 0
        self.mean, self.square = torch.zeros_like(weights), torch.zeros_like(weights)
        self.denominator = torch.empty_like(weights)

    def step(self, grad: torch.Tensor) -> None:
        beta1, beta2 = 0.9, 0.999
        self.t += 1
        if self.weight_decay:
            grad.add_(self.w, alpha=self.weight_decay)
        self.mean.lerp_(grad, 1 - beta1)
        self.square.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        correction2 = math.sqrt(1 - beta2**self.t)
        torch.sqrt(self.square, out=self.denominator).div_(correction2).add_(1e-8)
        self.w.addcdiv_(self.mean, self.denominator, value=-self.lr / (1 - beta1**self.t))


def _same_but_seed(configs: list[TrainConfig]) -> bool:
    return all(replace(c, seed=0) == replace(configs[0], seed=0) for c in configs)


def train_together(configs: list[TrainConfig], outs: list[str | os.PathLike], progress: bool = False,
                   adopt: bool = False) -> list["Run"]:
    """Train runs that differ only in their seed as one batch; one run directory each.

    An output directory that is not empty is refused, unless ``adopt``: then a run already there (of the
    same configuration) is loaded instead of trained. Either way, a run that another process finishes
    first while this one trains is adopted.

    Every run's MLP lives in one ``ChainBatch`` (the batched engine's forward and hand-written backward)
    and one Adam buffer, so S seeds cost little more than one. Each run keeps its own initialisation, train
    split and minibatch stream (all keyed by its seed), so it does not matter which runs train together.
    """
    if not configs or len(configs) != len(outs) or len({Path(o).resolve() for o in outs}) != len(outs):
        raise FastLLCError("give one distinct output directory per training configuration")
    for config in configs:
        config.validate()
    if not _same_but_seed(configs):
        raise FastLLCError("runs trained together must differ only in their seed")
    resources.require_training_memory(configs[0].p, configs[0].embed, configs[0].hidden)
    outs = [Path(out) for out in outs]
    if not adopt:
        return _train_here_or_portably(configs, outs, progress, adopt)
    there = {i: usable_run(c, out) for i, (c, out) in enumerate(zip(configs, outs))}
    runs = {i: run for i, run in there.items() if run is not None}  # there already, and whole
    todo = [i for i in range(len(configs)) if i not in runs]
    if todo:
        runs.update(zip(todo, _train_here_or_portably([configs[i] for i in todo], [outs[i] for i in todo], progress, adopt)))
    return [runs[i] for i in range(len(configs))]


def usable_run(config: TrainConfig, out: Path) -> "Run | None":
    """The run already at ``out`` (a cache or a sweep's runs/ folder, named by its config), or None to train
    it. A damaged one (a deleted checkpoint, an edited config) is moved aside, kept for inspection, with a
    warning: it is retrained instead of failing every later command that needs it."""
    if not _holds_files(out):
        return None
    try:
        return _adopted(config, out)
    except FastLLCError as err:
        reason = str(err).split("; the run is incomplete or damaged")[0]
        aside = storage.move_aside(out)
        if aside is not None:  # None: another process moved it first
            warnings.warn(f"the run {out} is damaged ({reason}); moved it to {aside.name} and training it again",
                          RuntimeWarning, stacklevel=3)
        return None


def _adopted(config: TrainConfig, out: Path) -> "Run":
    run = Run.load(out)
    if run.config != config:
        raise FastLLCError(f"{out} holds a run of another configuration ({run.config.run_name()}); "
                           "remove it or choose another directory")
    return run


def _train_here_or_portably(configs: list[TrainConfig], outs: list[Path], progress: bool, adopt: bool) -> list["Run"]:
    """``_train_batch`` in this process, or for portable runs in a child process started with PyTorch's
    DEFAULT kernels (``machine.PORTABLE_ENVIRONMENT``): the kernel choice is made once per process."""
    if not configs[0].portable or in_portable_environment():
        return _train_batch(configs, outs, progress, adopt)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    saved = {key: os.environ.get(key) for key in PORTABLE_ENVIRONMENT}
    os.environ.update(PORTABLE_ENVIRONMENT)  # a spawned child copies the environment when it starts
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
            paths = child.submit(_train_portably, configs, outs, progress, adopt).result()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return [Run.load(path) for path in paths]


def _train_portably(configs, outs, progress, adopt) -> list[Path]:
    if not in_portable_environment():  # never train a "portable" run with the vector kernels
        raise FastLLCError("portable training needs PyTorch's DEFAULT CPU kernels, but ATEN_CPU_CAPABILITY="
                           f"default was not honoured ({machine_record()['torch_cpu_capability']})")
    return [run.path for run in _train_batch(configs, outs, progress, adopt)]


@single_threaded_torch()  # tensors of a few kB: a second thread only adds synchronisation (measured 2-10× slower)
def _train_batch(configs: list[TrainConfig], outs: list[Path], progress: bool, adopt: bool) -> list["Run"]:
    from .engines.mlp import ChainBatch
    from .sampling.contract import flat_parameters

    first, S = configs[0], len(configs)
    tasks = [c.make_task() for c in configs]
    models = [c.new_model() for c in configs]
    writers = []
    try:
        for config, task, out in zip(configs, tasks, outs):
            writers.append(_RunWriter(config, task, out, adopt))
        m, n = first.batch_size, tasks[0].n_train
        batch = ChainBatch(first.p, first.embed, first.hidden, torch.stack([flat_parameters(x)[2] for x in models]), m)
        adam = _Adam(batch.W, first.lr, first.weight_decay)
        pairs = torch.cat([t.train_data()[0] for t in tasks])  # run s's split at rows s·n ..
        labels = torch.cat([t.train_data()[1] for t in tasks])
        offsets = (torch.arange(S) * n).unsqueeze(1)
        streams = [generator(c.seed, "batches") for c in configs]
        scale, loss_sum = torch.full((S, 1, 1), 1.0 / m), torch.empty(S)  # G = ∇L_m
        steps = checkpoint_steps(first.batches, first.checkpoints)
        bar = tqdm(total=first.batches, desc=f"train p={first.p} ×{S}", disable=not progress, leave=False)
        for step in range(first.batches + 1):
            if step in steps:
                for model, row, writer in zip(models, batch.to_chain_major(batch.W), writers):
                    torch.nn.utils.vector_to_parameters(row, model.parameters())
                    writer.checkpoint(step, model)
            if step == first.batches:
                break
            examples = (torch.stack([torch.randint(n, (m,), generator=g) for g in streams]) + offsets).view(-1)
            batch.loss_and_scaled_grad(pairs[examples].view(S, m, 2), labels[examples].view(S, m), scale, loss_sum)
            adam.step(batch.G)
            bar.update()
        bar.close()
        return [writer.finish(steps) for writer in writers]
    finally:
        for writer in writers:
            writer.discard()


def train(config: TrainConfig, out: str | os.PathLike, progress: bool = False) -> "Run":
    """Train with Adam (coupled L2 weight decay) on minibatches drawn with replacement; write a run dir."""
    return train_together([config], [out], progress)[0]


def cached_run(config: TrainConfig, root: str | os.PathLike, progress: bool = False,
               notice: Callable[[str], None] | None = None) -> "Run":
    """The run of ``config`` under ``root/runs/<run name>``, trained there once if it is not there yet.

    Safe to call from any number of processes at once: each loads the finished run, or trains its own and
    adopts the first one finished. ``notice`` (e.g. a print to stderr) is told when training starts.
    """
    path = Path(root) / "runs" / config.validate().run_name()
    run = usable_run(config, path)
    if run is not None:
        return run
    if notice is not None:
        notice(f"training {config.run_name()} once (cached in {path.parent})")
    return train_together([config], [path], progress, adopt=True)[0]


@dataclass
class Run:
    """A finished training run on disk."""

    path: Path
    config: TrainConfig
    steps: list[int]  # step of checkpoint k
    metrics: list[dict]  # metrics of checkpoint k

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Run":
        """Load and check a run directory: config, one metrics line per checkpoint, every checkpoint file."""
        path = Path(path)
        if not path.is_dir():
            raise FastLLCError(f"run directory {path} does not exist" if not path.exists()
                               else f"run directory {path} is not a directory")
        config, steps = _read_config(path / "config.json")
        try:
            metrics = _read_metrics(path / "metrics.jsonl", steps)
            shapes = {name: value.shape for name, value in config.new_model().state_dict().items()}
            for step in steps:  # every checkpoint's contents, not only its name: refused before any sampling
                _read_state(path / "checkpoints" / f"step_{step:05d}.pt", shapes)
        except FastLLCError as err:
            raise FastLLCError(f"{err}; the run is incomplete or damaged: {retrain_advice(config, path)}") from None
        return cls(path, config, steps, metrics)

    def checkpoint_index(self, checkpoint: int | None) -> int:
        """Resolve a checkpoint index; None or -1 is the final weights."""
        last = len(self.steps) - 1
        if checkpoint is None:
            return last
        checkpoint = check_int("checkpoint", checkpoint)
        if checkpoint == -1:
            return last
        if not 0 <= checkpoint <= last:
            raise FastLLCError(f"checkpoint {checkpoint} does not exist; {self.path} has checkpoints 0..{last}")
        return checkpoint

    def checkpoint_path(self, checkpoint: int | None = None) -> Path:
        return self.path / "checkpoints" / f"step_{self.steps[self.checkpoint_index(checkpoint)]:05d}.pt"

    def load_model(self, checkpoint: int | None = None) -> torch.nn.Module:
        """The model at checkpoint k (default: final), loaded safely (weights_only)."""
        model = self.config.new_model()
        model.load_state_dict(_read_state(self.checkpoint_path(checkpoint), model.state_dict()))
        return model.eval()

    def task(self) -> Task:
        return self.config.make_task()


def _read_state(file: Path, expected: dict) -> dict:
    """One checkpoint's state dict, loaded safely (weights_only: tensors only, never code) and checked
    against ``expected`` ({name: shape or tensor} of the run's architecture); a one-line FastLLCError that
    says whether the file is missing, refused as unsafe, corrupt or of another architecture."""
    if not file.is_file():
        raise FastLLCError(f"checkpoint file {file} is missing")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if re.search(r"unsupported global|is blocked|allowed global", str(err), re.IGNORECASE):  # torch's words
            # (2.4 to 2.13) for a pickle that names a function or class it will not import: code, not tensors
            raise FastLLCError(f"checkpoint {file} was refused as unsafe: it holds Python objects or code, not "
                               "only tensors (torch.load with weights_only=True)") from None
        raise FastLLCError(f"checkpoint {file} is corrupt (UnpicklingError)") from None
    except Exception as err:  # torch raises many types for a damaged file; all mean the same here
        raise FastLLCError(f"checkpoint {file} is corrupt ({type(err).__name__})") from None
    shapes = {name: getattr(value, "shape", value) for name, value in expected.items()}
    if not (isinstance(state, dict) and set(state) == set(shapes) and all(
            isinstance(state[k], torch.Tensor) and state[k].is_floating_point() and state[k].shape == shapes[k]
            for k in shapes)):
        raise FastLLCError(f"checkpoint {file} does not match the run's architecture (its tensors' names or shapes)")
    return state


# TrainConfig field -> the `fastllc train` option that sets it (lr, weight_decay, batch_size, train_frac have none)
_TRAIN_OPTIONS = dict(p="--p", task="--task", embed="--embed", hidden="--hidden", batches="--batches",
                      checkpoints="--checkpoints", seed="--train-seed", init_scale="--init-scale", split="--split",
                      portable="--portable")


def retrain_advice(config: TrainConfig, path: Path) -> str:
    """The one command that retrains a damaged run in place: `fastllc train` refuses a non-empty --out, so
    the damaged directory is moved aside first (kept for inspection)."""
    default = TrainConfig(p=config.p)
    if any(getattr(config, name) != getattr(default, name) for name in ("lr", "weight_decay", "batch_size", "train_frac")):
        return (f"move it aside and retrain it from Python: fastllc.train({config!r}, {str(path)!r}) "
                "(its lr, weight decay, batch size or train fraction have no command-line option)")
    options = " ".join(option if isinstance(getattr(config, name), bool) else f"{option} {getattr(config, name)}"
                       for name, option in _TRAIN_OPTIONS.items()
                       if name in ("p", "batches", "checkpoints") or getattr(config, name) != getattr(default, name))
    aside = next(f"{path}.damaged" + (f"-{n}" if n else "") for n in range(1000)
                 if not Path(f"{path}.damaged" + (f"-{n}" if n else "")).exists())  # mv into an existing one nests it
    quoted = shlex.quote(str(path))
    return f"retrain it with: mv {quoted} {shlex.quote(aside)} && fastllc train {options} --out {quoted}"


DAMAGED = ("the run is incomplete or damaged: retrain it with `fastllc train` and the options it was made with, "
           "into a new --out")
METRIC_KEYS = ("step", "train_loss", "train_acc", "test_loss", "test_acc")


def _read_json_file(file: Path, what: Callable[[str], object], first: bool = True):
    """``what`` of the file's text; ``first``: config.json, whose absence means "not a run" (later files'
    errors get the retraining advice from ``Run.load``)."""
    try:
        return what(file.read_text())
    except FileNotFoundError:
        raise FastLLCError(f"{file.parent} is not a fastllc run: {file.name} is missing" if first
                           else f"{file} is missing") from None
    except (OSError, ValueError) as err:  # ValueError: bad JSON or bad UTF-8
        raise FastLLCError(f"{file} is unreadable ({err})" + (f"; {DAMAGED}" if first else "")) from None


def _read_config(file: Path) -> tuple[TrainConfig, list[int]]:
    """The TrainConfig and checkpoint steps of config.json, every field present and of its type."""
    record = _read_json_file(file, json.loads)
    if not isinstance(record, dict):
        raise FastLLCError(f"{file} is not a JSON object; {DAMAGED}")
    record = {**LATER_FIELDS, **record}  # a run written before these settings existed used their defaults
    missing = [name for name in [f.name for f in fields(TrainConfig)] + ["checkpoint_steps"] if name not in record
               or (name == "batches" and record[name] is None)]  # a saved config holds the number it trained
    if missing:
        raise FastLLCError(f"{file} lacks {', '.join(missing)}; {DAMAGED}")
    try:
        config = TrainConfig(**{f.name: record[f.name] for f in fields(TrainConfig)}).validate()
    except FastLLCError as err:
        raise FastLLCError(f"{file}: {err}; {DAMAGED}") from None
    steps = record["checkpoint_steps"]
    if not (isinstance(steps, list) and steps and all(_is_integer(s) and 0 <= s <= config.batches for s in steps)
            and all(a < b for a, b in zip(steps, steps[1:]))):
        raise FastLLCError(f"{file}: checkpoint_steps must be increasing integers in 0..{config.batches}, "
                           f"got {steps!r}; {DAMAGED}")
    return config, steps


def _read_metrics(file: Path, steps: list[int]) -> list[dict]:
    """One line per checkpoint, each with the checkpoint's step and numeric losses and accuracies."""
    lines = [line for line in _read_json_file(file, str.splitlines, first=False) if line.strip()]
    if len(lines) != len(steps):
        raise FastLLCError(f"{file} has {len(lines)} line{'s' * (len(lines) != 1)} for {len(steps)} checkpoints")
    metrics = []
    for number, (line, step) in enumerate(zip(lines, steps), start=1):
        try:
            entry = json.loads(line)
        except ValueError:
            raise FastLLCError(f"{file} line {number} is not JSON") from None
        bad = [key for key in METRIC_KEYS if not (isinstance(entry, dict) and _is_number(entry.get(key)))]
        if bad:
            raise FastLLCError(f"{file} line {number} lacks a numeric {bad[0]}")
        if entry["step"] != step:
            raise FastLLCError(f"{file} line {number} is for step {entry['step']}, but checkpoint {number - 1} "
                               f"is step {step}")
        metrics.append(entry)
    return metrics
