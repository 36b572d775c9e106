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

``posterior_llc(problem, nbeta, gamma)`` is the other half of the ground truth: the expectation
nβ·E[L_n(w) − L_n(w*)] under the localised posterior ∝ exp(−nβ·K(w) − γ/2·‖w − w*‖²) itself, at this finite
nβ and γ, sampled by MALA on the exact K (no data, no minibatch, no step-size bias). It is what an SGLD estimate
converges to when its chains are long and its step small; λ is its limit as nβ → ∞. Comparing the two splits a
calibration error into the sampler's part and the finite-nβ part (docs/calibration.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from .dln import dln_data, dln_learning_coefficient, dln_teacher, half_squared_error, reduced_rank_regression_llc

FAMILIES = ("dln", "rrr", "regular", "monomial")
MALA_ACCEPTANCE = 0.57  # MALA's step is tuned to this acceptance in burn-in (optimal: Roberts & Rosenthal 1998)


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


@dataclass
class PosteriorLLC:
    """nβ·E[K] under the localised posterior, from MALA: the mean over chains of the second half, its standard
    error over chains, and the mean of each tenth of the chains (a trend in them says: not settled yet)."""

    llc: float
    se: float
    tenths: list
    acceptance: float
    step: float  # MALA's tuned ε in w ← w − ε∇U + √(2ε)·ξ
    nbeta: float
    gamma: float
    steps: int


def exact_potential(problem: Problem) -> Callable[[torch.Tensor], torch.Tensor]:
    """K(w) = L_n(w) − L_n(w*) for a batch of flat weight vectors [C, d] (float64), exactly, without the data:
    ½‖W_L⋯W_1 − W*‖² for the linear families (whitened inputs, noise orthogonal to them: ``dln.dln_data``),
    ½·Σ_b Π_i w_i^{2k_i} for the monomials."""
    if problem.family == "monomial":
        blocks = problem.info["blocks"]

        def monomials(w):
            terms, start = [], 0
            for block in blocks:
                powers = torch.tensor(block, dtype=w.dtype) * 2
                terms.append(w[:, start:start + len(block)].pow(powers).prod(1))
                start += len(block)
            return 0.5 * torch.stack(terms, 1).sum(1)
        return monomials
    shapes = [layer.weight.shape for layer in problem.model]
    target = _product([layer.weight.detach().double().unsqueeze(0) for layer in problem.model])

    def linear(w):
        layers, start = [], 0
        for rows, cols in shapes:
            layers.append(w[:, start:start + rows * cols].reshape(-1, rows, cols))
            start += rows * cols
        return 0.5 * (_product(layers) - target).pow(2).sum((1, 2))
    return linear


def _product(layers):
    product = layers[0]
    for layer in layers[1:]:
        product = layer @ product
    return product


def posterior_llc(problem: Problem, nbeta: float | None = None, gamma: float = 1.0, *, chains: int = 8,
                  steps: int = 50_000, seed: int = 0) -> PosteriorLLC:
    """nβ·E[K(w)] under p(w) ∝ exp(−nβ·K(w) − γ/2·‖w − w*‖²), by MALA from w* (``exact_potential``; nβ default
    n/log n). The first half is burn-in, during which the step is tuned to ``MALA_ACCEPTANCE``; the
    second half, a valid MALA chain at a fixed step, gives the estimate. The Metropolis test removes the step's
    bias, so only the chains' length limits it: read ``tenths`` before trusting it."""
    n = len(problem.data[1])
    nbeta = n / math.log(n) if nbeta is None else float(nbeta)
    potential = exact_potential(problem)
    centre = torch.cat([p.detach().double().reshape(-1) for p in problem.model.parameters()])
    generator = torch.Generator().manual_seed(seed)

    def energy(w):
        w = w.detach().requires_grad_(True)
        k = potential(w)
        u = nbeta * k + gamma / 2 * (w - centre).pow(2).sum(1)
        (grad,) = torch.autograd.grad(u.sum(), w)
        return u.detach(), grad, k.detach()

    w = centre.repeat(chains, 1)
    state, step = energy(w), 0.5 / nbeta  # below the stiffest direction's limit while K's curvature is ≤ 4
    per_chain = torch.zeros(chains, dtype=torch.float64)
    tenths, tenth, running, accepted = [], max(1, steps // 10), 0.0, 0.0
    for t in range(steps):
        w, state, rate = _mala_step(w, state, step, energy, generator)
        running += float(nbeta * state[2].mean())
        if t < steps // 2:
            step *= math.exp((rate - MALA_ACCEPTANCE) / 10)  # Robbins–Monro on log ε; frozen after burn-in
        else:
            per_chain += nbeta * state[2]
            accepted += rate
        if (t + 1) % tenth == 0:
            tenths.append(running / tenth)
            running = 0.0
    kept = steps - steps // 2
    per_chain /= kept
    return PosteriorLLC(llc=float(per_chain.mean()), se=float(per_chain.std() / math.sqrt(chains)), tenths=tenths,
                        acceptance=accepted / kept, step=step, nbeta=nbeta, gamma=gamma, steps=steps)


def _mala_step(w, state, step, energy, generator):
    """One Metropolis-adjusted Langevin step of every chain: (w, (U, ∇U, K), mean acceptance probability)."""
    u, grad, _ = state
    proposal = w - step * grad + math.sqrt(2 * step) * torch.randn(w.shape, generator=generator, dtype=w.dtype)
    new = energy(proposal)
    forward = (proposal - w + step * grad).pow(2).sum(1)
    backward = (w - proposal + step * new[1]).pow(2).sum(1)
    log_ratio = u - new[0] + (forward - backward) / (4 * step)
    probability = torch.exp(torch.clamp(log_ratio, max=0.0))
    accept = torch.rand(len(w), generator=generator, dtype=w.dtype) < probability
    w = torch.where(accept[:, None], proposal, w)
    state = tuple(torch.where(accept[:, None] if s.dim() == 2 else accept, n, s) for s, n in zip(state, new))
    return w, state, float(probability.mean())
