"""The study's tasks: modular addition and a random commutative operation on Z_p, with a seeded split.

A task is the full table of p² pairs (a, b) and their labels; ``train`` and ``test`` index into it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import FastLLCError
from .seeding import generator

TASK_KINDS = ("add", "random")
SPLITS = ("per-seed", "fixed")  # TrainConfig.split


def split_seed(seed: int, split: str) -> int:
    """The seed that keys a run's task table and train split: its own ("per-seed"), or 0 for every run
    ("fixed": the seeds of one p share one split and differ by initialisation and batches, as in the study)."""
    if split not in SPLITS:
        raise FastLLCError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return seed if split == "per-seed" else 0


@dataclass(frozen=True)
class Task:
    """All p² examples of a binary operation on Z_p and a train/test split of them."""

    p: int
    kind: str
    pairs: torch.Tensor  # [p², 2] int64: (a, b)
    labels: torch.Tensor  # [p²] int64: a ∘ b
    train: torch.Tensor  # [n_train] int64 indices into pairs
    test: torch.Tensor  # [n_test] int64 indices into pairs

    @property
    def n_train(self) -> int:
        return int(self.train.numel())

    def train_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pairs[self.train], self.labels[self.train]

    def test_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pairs[self.test], self.labels[self.test]


def random_commutative_table(p: int, seed: int) -> torch.Tensor:
    """A symmetric p×p table of labels drawn uniformly from [0, p); the same seed gives the same table."""
    upper = torch.randint(p, (p, p), generator=generator(seed, "random-table", p))
    return torch.triu(upper) + torch.triu(upper, diagonal=1).T


def train_size(p: int, train_frac: float) -> int:
    """n, the number of training examples of a split of the p² pairs (known without building the task)."""
    return max(1, round(train_frac * p * p))


def make_task(p: int, kind: str = "add", seed: int = 0, train_frac: float = 0.8) -> Task:
    """The task ``kind`` on Z_p, split at random (seeded) into ``train_frac`` train and the rest test."""
    if p < 2:
        raise FastLLCError(f"p must be at least 2, got {p}")
    if kind not in TASK_KINDS:
        raise FastLLCError(f"unknown task {kind!r}; choose one of {', '.join(TASK_KINDS)}")
    if not 0.0 < train_frac <= 1.0:
        raise FastLLCError(f"train fraction must be in (0, 1], got {train_frac}")
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    pairs = torch.stack([a.reshape(-1), b.reshape(-1)], dim=1)
    if kind == "add":
        labels = (pairs[:, 0] + pairs[:, 1]) % p
    else:
        labels = random_commutative_table(p, seed)[pairs[:, 0], pairs[:, 1]]
    order = torch.randperm(p * p, generator=generator(seed, "split", p))
    n_train = train_size(p, train_frac)
    return Task(p, kind, pairs, labels, order[:n_train].sort().values, order[n_train:].sort().values)
