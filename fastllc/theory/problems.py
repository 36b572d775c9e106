"""Random problems whose learning coefficient is known exactly: the ground truth calibration is judged on.

``draw_problems(seed, count)`` draws fresh models with their data, loss and exact λ from a seed, so that no
rule can be tuned to a fixed list. Four families, each built so that w* is the exact minimum of the empirical
loss L_n (inputs whitened in-sample, noise orthogonal to them: ``dln.dln_data``), which the estimator assumes:

- ``dln``: deep linear networks, 2–6 layers, widths 2–16, a teacher of random rank (Aoyagi 2024,
  ``dln.dln_learning_coefficient``);
- ``rrr``: reduced-rank regression, the two-layer case (Aoyagi & Watanabe 2005);
- ``regular``: linear regression y = W x + noise with d weights, λ = d/2;
- ``monomial``: independent blocks of normal-crossing potentials. Block b has 1–3 weights and exponents
  k_i ∈ {1, 2}; the model is f_b(w, x) = x_b·Π_{i∈b} w_i^{k_i} with truth f = 0 at w* = 0, so that
  L_n(w) − L_n(w*) = ½ Σ_b Π_{i∈b} w_i^{2k_i} exactly and λ = Σ_b min_{i∈b} 1/(2k_i) (the RLCT of a normal
  crossing with a prior positive at w*: Watanabe 2009, Ch. 2; the blocks' coefficients add). The
  multiplicities (ties in the min) make these the hardest for finite nβ: λ̂ approaches λ only as
  1/log(nβ), which the ``llc`` field does not include.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from .dln import dln_data, dln_learning_coefficient, dln_teacher, half_squared_error, reduced_rank_regression_llc

FAMILIES = ("dln", "rrr", "regular", "monomial")


@dataclass
class Problem:
    """A model at its exact empirical minimum w*, its data and loss, and its exact learning coefficient."""

    family: str
    name: str
    model: nn.Module
    data: tuple[torch.Tensor, torch.Tensor]
    loss_fn: Callable
    llc: float
    info: dict = field(default_factory=dict)

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def draw_problems(seed: int, count: int, families: Sequence[str] = ("dln",), n: int = 20_000) -> list[Problem]:
    """``count`` problems drawn from ``seed``, cycling through ``families``, each with ``n`` examples."""
    unknown = set(families) - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown problem families {sorted(unknown)}; known: {FAMILIES}")
    generator = torch.Generator().manual_seed(seed)
    draw = {"dln": draw_dln, "rrr": draw_rrr, "regular": draw_regular, "monomial": draw_monomial}
    problems = []
    for index in range(count):
        family = families[index % len(families)]
        problem_seed = int(torch.randint(0, 2**31 - 1, (), generator=generator))
        problems.append(draw[family](problem_seed, n))
    return problems


def _integers(generator: torch.Generator, low: int, high: int, size: int = 1) -> list[int]:
    """``size`` integers uniform on [low, high] (both included)."""
    return torch.randint(low, high + 1, (size,), generator=generator).tolist()


def draw_dln(seed: int, n: int, layers: tuple[int, int] = (2, 6), widths: tuple[int, int] = (2, 16)) -> Problem:
    """A deep linear network with a random number of layers, random widths and a teacher of random rank ≥ 1."""
    generator = torch.Generator().manual_seed(seed)
    depth = _integers(generator, *layers)[0]
    sizes = _integers(generator, *widths, size=depth + 1)
    rank = _integers(generator, 1, min(sizes))[0]
    teacher = dln_teacher(sizes, rank, seed)
    return Problem("dln", "dln " + "-".join(map(str, sizes)) + f" r{rank}", teacher, dln_data(teacher, n, seed),
                   half_squared_error, dln_learning_coefficient(sizes, rank), dict(widths=sizes, rank=rank))


def draw_rrr(seed: int, n: int) -> Problem:
    """Reduced-rank regression y = B·A·x: a two-layer DLN, λ from Aoyagi & Watanabe's closed form."""
    generator = torch.Generator().manual_seed(seed)
    inputs, hidden, outputs = _integers(generator, 2, 16, size=3)
    rank = _integers(generator, 1, min(inputs, hidden, outputs))[0]
    teacher = dln_teacher((inputs, hidden, outputs), rank, seed)
    return Problem("rrr", f"rrr {inputs}-{hidden}-{outputs} r{rank}", teacher, dln_data(teacher, n, seed),
                   half_squared_error, reduced_rank_regression_llc(inputs, outputs, hidden, rank),
                   dict(widths=[inputs, hidden, outputs], rank=rank))


def draw_regular(seed: int, n: int) -> Problem:
    """Linear regression with 2–64 weights (a one-layer DLN): regular, λ = d/2."""
    generator = torch.Generator().manual_seed(seed)
    inputs, outputs = _integers(generator, 1, 8, size=2)
    inputs = max(inputs, 2)
    teacher = dln_teacher((inputs, outputs), min(inputs, outputs), seed)
    return Problem("regular", f"regular {inputs}x{outputs}", teacher, dln_data(teacher, n, seed), half_squared_error,
                   inputs * outputs / 2, dict(widths=[inputs, outputs]))


class Monomials(nn.Module):
    """f_b(w, x) = x_b · Π_{i ∈ block b} w_i^{k_i}: one output per block, the weights at w* = 0."""

    def __init__(self, blocks: Sequence[Sequence[int]]):
        super().__init__()
        self.blocks = [list(block) for block in blocks]
        self.weight = nn.Parameter(torch.zeros(sum(len(b) for b in self.blocks)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs, start = [], 0
        for b, exponents in enumerate(self.blocks):
            w = self.weight[start:start + len(exponents)]
            start += len(exponents)
            product = torch.ones((), dtype=w.dtype)
            for i, k in enumerate(exponents):
                product = product * w[i] ** k
            outputs.append(x[..., b] * product)
        return torch.stack(outputs, dim=-1)


def monomial_llc(blocks: Sequence[Sequence[int]]) -> float:
    """Σ_b min_{i∈b} 1/(2k_i): each block is a normal crossing Π w_i^{2k_i} with a prior positive at 0."""
    return sum(min(1 / (2 * k) for k in block) for block in blocks)


def draw_monomial(seed: int, n: int) -> Problem:
    """2–6 blocks of 1–3 weights with exponents in {1, 2}; y = noise orthogonal to the whitened inputs."""
    generator = torch.Generator().manual_seed(seed)
    count = _integers(generator, 2, 6)[0]
    blocks = [_integers(generator, 1, 2, size=_integers(generator, 1, 3)[0]) for _ in range(count)]
    x = torch.randn(n, count, generator=generator, dtype=torch.float64)
    x = x @ torch.linalg.inv(torch.linalg.cholesky(x.T @ x / n)).T
    noise = torch.randn(n, count, generator=generator, dtype=torch.float64)
    noise -= x @ torch.linalg.solve(x.T @ x, x.T @ noise)
    name = "monomial " + " ".join("·".join(f"w^{2 * k}" for k in block) for block in blocks)
    return Problem("monomial", name, Monomials(blocks), (x.float(), noise.float()), half_squared_error,
                   monomial_llc(blocks), dict(blocks=blocks))


def relative_errors(problems: Sequence[Problem], estimates: Sequence[float]) -> list[float]:
    """(λ̂ − λ)/λ per problem (NaN where the estimate is missing)."""
    return [(e - p.llc) / p.llc if e is not None and math.isfinite(e) else math.nan
            for p, e in zip(problems, estimates)]
