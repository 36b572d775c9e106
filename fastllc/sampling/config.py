"""SGLD settings shared by every backend, validated once.

ε, γ and nβ may each be a scalar or one value per chain: a calibration grid is just a batch of chains.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence, Union

import torch

from ..errors import FastLLCError
from ..seeding import check_seed

PerChain = Union[float, Sequence[float], torch.Tensor]


def wbic_nbeta(n: int) -> float:
    """nβ = n / log n for n training examples (β = 1/log n, Watanabe's WBIC temperature): fastllc's default.
    Not devinterp's default, b/log b of the batch size (``compat.devinterp.default_nbeta``, devinterp's name)."""
    if n < 2:
        raise FastLLCError(f"the default nβ = n/log n needs n >= 2 training examples, got {n}")
    return n / math.log(n)


@dataclass(frozen=True)
class SGLDConfig:
    """Settings of one LLC estimate: ``chains`` SGLD chains of ``steps`` steps each, started at w*.

    The update (Lau, Murfet, Wei 2023) is
        w ← w − (ε/2)·[γ(w − w*) + nβ·∇L_m(w)] + N(0, ε·I),
    with L_m the mean loss on a minibatch of m = ``batch_size`` examples drawn with replacement.
    ``orthogonal`` removes from every increment its component along ∇L_n(w*)/‖∇L_n(w*)‖.
    Loss is recorded at w_t before each update; the first ``burn_in`` records are dropped, and of the rest
    the estimator uses every ``thin``-th (records burn_in + thin − 1, burn_in + 2·thin − 1, ...: devinterp's
    draws with ``num_steps_bw_draws = thin``). ``mala`` asks a backend that can (``generic``) to record the
    MALA acceptance probability of every step, as devinterp's ``MalaAcceptanceRate`` defines it.
    """

    chains: int = 4
    steps: int = 5000
    epsilon: PerChain = 1e-3
    gamma: PerChain = 5.0
    nbeta: PerChain | None = None  # None: n / log n
    batch_size: int = 64
    burn_in: int = 0
    orthogonal: bool = False
    seed: int = 0
    loss_bound: float | None = None  # a recorded loss above this marks a chain unhealthy; None: see llc.py
    thin: int = 1  # the estimator averages every thin-th record after burn-in
    mala: bool = False  # record the MALA acceptance probability of every step (backend generic)

    def validate(self) -> "SGLDConfig":
        if self.chains < 1:
            raise FastLLCError(f"chains must be at least 1, got {self.chains}")
        if self.steps < 1:
            raise FastLLCError(f"steps must be at least 1, got {self.steps}")
        if not 0 <= self.burn_in < self.steps:
            raise FastLLCError(f"burn-in must be in [0, steps) = [0, {self.steps}), got {self.burn_in}")
        if self.batch_size < 1:
            raise FastLLCError(f"batch size must be at least 1, got {self.batch_size}")
        if self.thin < 1 or self.thin > self.steps - self.burn_in:
            raise FastLLCError(f"thin must be in [1, steps − burn-in] = [1, {self.steps - self.burn_in}], "
                               f"got {self.thin}")
        check_seed(self.seed)  # the samplers' random streams key on a signed 64-bit integer
        self._values("epsilon", lambda v: v > 0, "> 0")  # as given, one value or C: not C copies of one value
        self._values("gamma", lambda v: v >= 0, ">= 0")
        if self.nbeta is not None:
            self._values("nbeta", lambda v: v > 0, "> 0")
        return self

    def per_chain(self, name: str, ok=lambda v: True, rule: str = "", n: int | None = None) -> torch.Tensor:
        """The setting ``name`` as a float64 vector of length ``chains`` (checked against ``rule``)."""
        return self._values(name, ok, rule, n).expand(self.chains).clone()

    def _values(self, name: str, ok, rule: str, n: int | None = None) -> torch.Tensor:
        """The setting ``name`` as given (one value or one per chain), as float64, checked against ``rule``."""
        value = getattr(self, name)
        if value is None:
            if n is None:
                raise FastLLCError(f"{name} is not set")
            value = wbic_nbeta(n)
        vector = torch.as_tensor(value, dtype=torch.float64).reshape(-1)
        if vector.numel() not in (1, self.chains):
            raise FastLLCError(f"{name} has {vector.numel()} values for {self.chains} chains")
        bad = [v for v in vector.tolist() if not (math.isfinite(v) and ok(v))]
        if bad:
            raise FastLLCError(f"{name} must be finite and {rule}, got {bad[0]}")
        return vector

    def hyperparameters(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ε, γ, nβ) as float64 vectors of length ``chains``; nβ defaults to n/log n."""
        return self.per_chain("epsilon"), self.per_chain("gamma"), self.per_chain("nbeta", n=n)

    def to_dict(self) -> dict:
        record = asdict(self)
        for key in ("epsilon", "gamma", "nbeta"):
            value = record[key]
            if isinstance(value, torch.Tensor):
                record[key] = value.tolist()
            elif isinstance(value, (list, tuple)):
                record[key] = [float(v) for v in value]
        return record
