"""Training the study's MLP and the run directory it leaves behind.

A run directory holds
    config.json        the TrainConfig, plus n_train and the checkpoint steps
    checkpoints/       step_XXXXX.pt state dicts (loaded with weights_only=True), checkpoint 0 = init
    metrics.jsonl      one line per checkpoint: step, train/test loss and accuracy
A run is written to a temporary sibling directory and renamed into place when complete, so a run
directory that exists is always whole.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import FastLLCError
from .model import ModularMLP
from .seeding import derive_seed, generator
from .tasks import TASK_KINDS, Task, make_task


def default_batches(p: int) -> int:
    """Training length of the published study: 10,000 batches, 15,000 for the larger p (41 and 53)."""
    return 15_000 if p >= 41 else 10_000


@dataclass(frozen=True)
class TrainConfig:
    p: int
    task: str = "add"
    embed: int = 8
    hidden: int = 32
    batches: int = 10_000
    checkpoints: int = 25
    seed: int = 0
    lr: float = 0.01
    weight_decay: float = 2e-4
    batch_size: int = 64
    train_frac: float = 0.8

    def validate(self) -> "TrainConfig":
        if self.p < 2:
            raise FastLLCError(f"p must be at least 2, got {self.p}")
        if self.task not in TASK_KINDS:
            raise FastLLCError(f"unknown task {self.task!r}; choose one of {', '.join(TASK_KINDS)}")
        for name in ("embed", "hidden", "batches", "checkpoints", "batch_size"):
            if getattr(self, name) < 1:
                raise FastLLCError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise FastLLCError(f"seed must be non-negative, got {self.seed}")
        if not (self.lr > 0 and self.weight_decay >= 0):
            raise FastLLCError("learning rate must be > 0 and weight decay >= 0")
        return self

    def make_task(self) -> Task:
        return make_task(self.p, self.task, self.seed, self.train_frac)

    def new_model(self) -> ModularMLP:
        """The model at initialisation: PyTorch's default init, seeded by (seed, "init")."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, "init"))
            return ModularMLP(self.p, self.embed, self.hidden)

    def run_name(self) -> str:
        return f"{self.task}-p{self.p}-e{self.embed}-h{self.hidden}-b{self.batches}-k{self.checkpoints}-seed{self.seed}"


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


def train(config: TrainConfig, out: str | os.PathLike, progress: bool = False) -> "Run":
    """Train with Adam (coupled L2 weight decay) on minibatches drawn with replacement; write a run dir."""
    config.validate()
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FastLLCError(f"{out} already exists and is not empty; choose another output directory")
    task = config.make_task()
    model = config.new_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    batch_rng = generator(config.seed, "batches")
    pairs, labels = task.train_data()
    steps = checkpoint_steps(config.batches, config.checkpoints)

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "checkpoints").mkdir(parents=True)
    metrics = []
    try:
        bar = tqdm(total=config.batches, desc=f"train p={config.p}", disable=not progress, leave=False)
        for step in range(config.batches + 1):
            if step in steps:
                torch.save(model.state_dict(), tmp / "checkpoints" / f"step_{step:05d}.pt")
                metrics.append(_metrics(step, model, task))
            if step == config.batches:
                break
            idx = torch.randint(task.n_train, (config.batch_size,), generator=batch_rng)
            loss = F.cross_entropy(model(pairs[idx]), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.update()
        bar.close()
        record = dict(asdict(config), n_train=task.n_train, checkpoint_steps=steps)
        (tmp / "config.json").write_text(json.dumps(record, indent=2) + "\n")
        (tmp / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Run.load(out)


@dataclass
class Run:
    """A finished training run on disk."""

    path: Path
    config: TrainConfig
    steps: list[int]  # step of checkpoint k
    metrics: list[dict]  # metrics of checkpoint k

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Run":
        path = Path(path)
        if not path.is_dir():
            raise FastLLCError(f"run directory {path} does not exist")
        try:
            record = json.loads((path / "config.json").read_text())
            config = TrainConfig(**{f.name: record[f.name] for f in fields(TrainConfig) if f.name in record})
            steps = [int(s) for s in record["checkpoint_steps"]]
            metrics = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line]
        except FileNotFoundError as err:
            raise FastLLCError(f"{path} is not a fastllc run: {Path(err.filename).name} is missing") from None
        except (ValueError, KeyError, TypeError) as err:
            raise FastLLCError(f"{path} has an unreadable config.json or metrics.jsonl ({err})") from None
        return cls(path, config.validate(), steps, metrics)

    def checkpoint_index(self, checkpoint: int | None) -> int:
        """Resolve a checkpoint index; None or -1 is the final weights."""
        last = len(self.steps) - 1
        if checkpoint is None or checkpoint == -1:
            return last
        if not 0 <= checkpoint <= last:
            raise FastLLCError(f"checkpoint {checkpoint} does not exist; {self.path} has checkpoints 0..{last}")
        return checkpoint

    def checkpoint_path(self, checkpoint: int | None = None) -> Path:
        return self.path / "checkpoints" / f"step_{self.steps[self.checkpoint_index(checkpoint)]:05d}.pt"

    def load_model(self, checkpoint: int | None = None) -> torch.nn.Module:
        """The model at checkpoint k (default: final), loaded safely (weights_only)."""
        file = self.checkpoint_path(checkpoint)
        if not file.is_file():
            raise FastLLCError(f"checkpoint file {file} is missing")
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
            model = self.config.new_model()
            model.load_state_dict(state)
        except Exception as err:  # torch raises many types for a damaged file; all mean the same here
            raise FastLLCError(f"checkpoint {file} is corrupt or does not match the run's architecture "
                               f"({type(err).__name__})") from None
        return model.eval()

    def task(self) -> Task:
        return self.config.make_task()
