"""Bayesian influence functions: posterior correlations (or covariances) between probe examples' losses.

Definition (Kreer et al. 2025, "Bayesian influence functions for Hessian-free data attribution", arXiv:2509.26544).
Up-weighting example i by ε in the tempered posterior moves the expectation of any observable φ by
∂E[φ]/∂ε = −β·Cov(ℓ_i, φ); with φ = ℓ_j the influence of i on j is read from Cov(ℓ_i, ℓ_j). devinterp 2.0.1's
``compute_bif`` reports +Corr(ℓ_i, ℓ_j) (or +Cov with ``compute_covariance``), no β and no minus sign, and so does
fastllc: a positive influence means that up-weighting i lowers j's expected loss (and vice versa).

Methods (devinterp's ``correlation_method``): ``"sequence"``, ℓ_i an example's loss (the weighted mean of its
tokens): an [N1, N2] matrix; ``"token"``, every token pair of every example pair: [N1, N2, K, K]
(``average_tokens``: the mean over the token pairs, [N1, N2]). Chains (devinterp's
``reduce_chain_dimension_method``): ``"stack"``, every (chain, draw) of the restriction's healthy chains is one
observation, centred on their common mean; ``"mean"``, the losses are first averaged over the chains at each
draw, then correlated over the draws. Covariances use the unbiased 1/(observations − 1), as ``torch.cov``.

Sources. From the running sums (``moments.py``), with no pass over the draws: "sequence" × "stack" always, "token"
× "stack" when the run kept ``token_moments``, "mean" when it kept ``chain_mean`` (every chain's draws, of which the
healthy ones are averaged). Otherwise from the raw draws (``raw=``, ``draws.open_draws``), blocked: ``block``
examples of the query rows and of the columns at a time, so memory is 2·observations·block·K·8 bytes plus the
result (N1·N2, or N1·N2·K² for tokens, float64), whatever N is. From the sums only the rows' and columns'
entries are read: beyond the run's sums, 8·c·R·C bytes (R, C: the rows' and columns' positions, N1 and N2 or
N1·K and N2·K; c chains) with "stack", a few float64 D·N·K arrays with "mean" (one chain's draws, their sum over
the chains, the others' mean), plus a few R·C matrices: the jackknife leaves out one chain at a time.

Standard errors (``se``), from the sums: the jackknife over chains, ``moments.jackknife_se`` of the matrix
recomputed without each chain in turn. With "stack" that is the matrix of the other chains' stacked draws; with
"mean" the matrix of the other chains' averaged series (Σ_c' x_c'd − x_cd)/(c − 1) over the draws d: the chains are
independent, so either is the error of the estimator, its centring and non-linearity included. It needs two healthy
chains (NaN with one). None from the raw draws (the blocked path keeps one matrix, not one per chain). With "mean"
the jackknife is conservative: the averaged series' covariance is mostly cross-chain products (c·(c − 1) of them,
each of mean 0, against c within-chain ones), second-order terms that the jackknife counts about twice (Efron and
Stein 1981), so its variance is up to ~2× the true one (measured on independent Gaussian chains, 8–16 of them:
1.6–1.9× for correlations, 2.1–2.3× for covariances; tests/test_observables.py), never less in expectation: the
standard error up to ~1.5× the true one (√2.3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import FastLLCError
from ..validate import check_choice, check_int
from .run import ObservedRun

METHODS, REDUCTIONS, KINDS = ("sequence", "token"), ("stack", "mean"), ("correlation", "covariance")


@dataclass
class Influence:
    """An influence matrix between query examples (``rows``) and examples (``cols``), with labels."""

    matrix: torch.Tensor  # [N1, N2] or [N1, N2, K, K]
    se: torch.Tensor | None
    rows: torch.Tensor  # example indices of the queries
    cols: torch.Tensor
    labels: list  # every probe example's label, "set[i]"
    method: str
    chains: str
    kind: str
    restriction: str

    def per_sequence(self) -> torch.Tensor:
        """[N1, N2]: the matrix, token pairs averaged (NaN pairs, e.g. masked tokens, left out)."""
        return self.matrix if self.matrix.dim() == 2 else self.matrix.nanmean(dim=(-1, -2))

    def top(self, k: int = 5, queries=None) -> dict:
        """{query label: [(label, value, se or None), ...]}: the ``k`` largest influences on each query (itself
        excluded), ranked by value (token method: by the per-sequence average)."""
        check_int("k", k, minimum=1)
        values = self.per_sequence()
        se = self.se if self.se is not None and self.se.dim() == 2 else None
        out = {}
        for a, i in enumerate(self.rows.tolist()):
            if queries is not None and i not in queries:
                continue
            order = torch.argsort(torch.nan_to_num(values[a], nan=-math.inf), descending=True).tolist()
            picked = [b for b in order if int(self.cols[b]) != i][:k]
            out[self.labels[i]] = [(self.labels[int(self.cols[b])], float(values[a, b]),
                                    None if se is None else float(se[a, b])) for b in picked]
        return out

    def format_top(self, k: int = 5, queries=None) -> str:
        lines = []
        for query, hits in self.top(k, queries).items():
            cells = ", ".join(f"{label} {v:+.3f}" + ("" if s is None else f" ± {s:.3f}") for label, v, s in hits)
            lines.append(f"{query}: {cells}")
        return "\n".join(lines)


def _labels(probes) -> list:
    return [f"{name}[{i - probes.offsets[o]}]" for o, name in enumerate(probes.names)
            for i in range(probes.offsets[o], probes.offsets[o + 1])]


def _as_index(value, n: int, name: str) -> torch.Tensor:
    if value is None:
        return torch.arange(n)
    index = torch.as_tensor(list(value) if not isinstance(value, torch.Tensor) else value, dtype=torch.long)
    if index.dim() != 1 or len(index) == 0 or bool((index < 0).any()) or bool((index >= n).any()):
        raise FastLLCError(f"{name} must list example indices in [0, {n}), got {value!r}")
    return index


def compute_bif(run: ObservedRun, *, restriction: str = "full", method: str = "sequence", chains: str = "stack",
                kind: str = "correlation", rows=None, cols=None, average_tokens: bool = False,
                block: int = 256) -> Influence:
    """The influence matrix of ``restriction``'s chains in ``run`` (module docstring). ``rows``/``cols``: example
    indices (default all; devinterp's ``batch_index_range_1/2``)."""
    for name, value, choices in (("method", method, METHODS), ("chains", chains, REDUCTIONS), ("kind", kind, KINDS)):
        check_choice(name, value, choices)
    check_int("block", block, minimum=1)
    index = run.chains(restriction)
    if len(index) < (2 if chains == "stack" else 1):
        raise FastLLCError(f"restriction {restriction!r} has {len(index)} healthy chains; too few for influences")
    n = run.probes.examples
    r, c = _as_index(rows, n, "rows"), _as_index(cols, n, "cols")
    matrix, se = _from_sums(run, index, method, chains, kind, r, c)
    if matrix is None:
        matrix = _from_draws(run, index, method, chains, kind, restriction, r, c, block)
    if method == "token" and average_tokens:
        matrix, se, method = matrix.nanmean(dim=(-1, -2)), None, "token"
    return Influence(matrix, se, r, c, _labels(run.probes), method, chains, kind, restriction)


def _from_sums(run, index, method, chains, kind, rows, cols):
    """(matrix [rows, cols], se or None) from the running sums, or (None, None) when they cannot give it. Only the
    rows' and columns' entries of the second moments are read, and the jackknife holds one matrix at a time."""
    m, w, k = run.moments, run.probes.example_weights(), run.probes.elements
    r, c = _positions(rows, method, k), _positions(cols, method, k)
    if chains == "mean":
        return (None, None) if m.chain_draws is None else _chain_mean(m.chain_draws[index], w, method, kind, r, c)
    if method == "token" and m.xx is None:
        return None, None
    first, second = ((m.x[index] * w).sum(-1), m.ss) if method == "sequence" else (m.x[index].flatten(1), m.xx)
    cross = second[index[:, None, None], r[None, :, None], c[None, None, :]]  # Σ v_r v_c per chain [c, R, C]
    square = torch.diagonal(second, dim1=1, dim2=2)[index]  # Σ v² per chain [c, P]
    count = m.count[index]
    sums = [first, cross, square, count]
    total = [t.sum(dim=0) for t in sums]
    estimate = lambda parts: _finish(*_covariance(*parts, r, c), kind, method, k)
    matrix = estimate(total)
    return matrix, _jackknife(lambda j: estimate([t - s[j] for t, s in zip(total, sums)]), len(count), matrix)


def _positions(examples: torch.Tensor, method: str, elements: int) -> torch.Tensor:
    """The examples' positions in the loss vector v: example i ("sequence"), or its tokens i·K .. i·K + K − 1."""
    if method == "sequence":
        return examples
    return (examples[:, None] * elements + torch.arange(elements)).reshape(-1)


def _covariance(first, cross, square, count, rows, cols) -> tuple:
    """Unbiased (covariance [R, C] between positions ``rows`` and ``cols``, their variances [R], [C]) from Σv [P],
    Σ v_r v_c [R, C], Σ v² [P] and the count."""
    mean = first / count
    variance = (square - count * mean ** 2) / (count - 1)
    return (cross - count * mean[rows, None] * mean[None, cols]) / (count - 1), variance[rows], variance[cols]


def _finish(cov: torch.Tensor, var_rows, var_cols, kind: str, method: str, elements: int) -> torch.Tensor:
    """Covariance [R, C] (and the variances) → the matrix asked for: correlation or covariance, token layout
    [N1, N2, K, K]."""
    if kind == "correlation":
        cov = cov / (var_rows.clamp(min=0).sqrt()[:, None] * var_cols.clamp(min=0).sqrt()[None, :])
    if method == "sequence":
        return cov
    return cov.reshape(cov.shape[0] // elements, elements, cov.shape[1] // elements, elements).transpose(1, 2)


def _jackknife(without, chains: int, full: torch.Tensor) -> torch.Tensor:
    """``moments.jackknife_se`` of the values ``without(j)`` (the estimate without chain j), j < ``chains``, one at
    a time: Σ d and Σ d² of d = value − θ (θ: ``full``, the all-chain estimate, as a shift that keeps the sums
    small, so no precision is lost to cancellation) give Σ (value − mean)² = Σ d² − (Σ d)²/c. NaN with one chain."""
    if chains < 2:
        return torch.full(full.shape, math.nan, dtype=torch.float64)
    shift = torch.nan_to_num(full, nan=0.0, posinf=0.0, neginf=0.0)
    first, second = torch.zeros_like(shift), torch.zeros_like(shift)
    for j in range(chains):
        d = without(j) - shift
        first += d
        second += d * d
    return ((chains - 1) / chains * (second - first * first / chains)).clamp(min=0).sqrt()


def _chain_mean(draws: torch.Tensor, weights, method: str, kind: str, rows, cols) -> tuple:
    """(matrix, jackknife se) of chains averaged at each draw, from the chains' draws [c, D, N, K] (float32,
    promoted to float64 one chain at a time; module docstring): the series of all c chains' mean, and for each
    chain the series of the others' mean. ``rows``/``cols``: positions (``_positions``)."""
    chains, k = len(draws), draws.shape[-1]

    def series(j: int) -> torch.Tensor:  # chain j's losses [D, P], float64
        x = draws[j].double()
        return (x * weights).sum(-1) if method == "sequence" else x.flatten(1)

    total = series(0)
    for j in range(1, chains):
        total += series(j)
    estimate = lambda averaged: _finish(*_series_covariance(averaged, rows, cols), kind, method, k)
    matrix = estimate(total / chains)
    return matrix, _jackknife(lambda j: estimate((total - series(j)) / (chains - 1)), chains, matrix)


def _series_covariance(series: torch.Tensor, rows, cols) -> tuple:
    """Unbiased (covariance [R, C], variances [R], [C]) over the draws of series [D, P] at positions rows, cols."""
    centred = series - series.mean(dim=0, keepdim=True)
    left, right, d = centred[:, rows], centred[:, cols], len(series) - 1
    return left.T @ right / d, left.pow(2).sum(0) / d, right.pow(2).sum(0) / d


def _from_draws(run, index, method, chains, kind, restriction, rows, cols, block) -> torch.Tensor:
    """The matrix from the raw draws on disk, ``block`` examples at a time (module docstring)."""
    if run.raw is None:
        need = "token_moments=True" if method == "token" else "chain_mean=True"
        raise FastLLCError(f"influences with method={method!r}, chains={chains!r} need the raw draws or "
                           f"{need} in the run; run with raw='draws.npz' or that option")
    from .draws import open_draws
    losses, weights = open_draws(run.raw).losses, run.probes.example_weights()
    chain_index = index.numpy()

    def read(examples: torch.Tensor) -> torch.Tensor:
        part = torch.from_numpy(np.asarray(losses[:, :, examples.numpy()], dtype=np.float64)[chain_index])
        part = part.mean(dim=0) if chains == "mean" else part.flatten(0, 1)  # [obs, b, K]
        return (part * weights[examples]).sum(-1, keepdim=True) if method == "sequence" else part

    return _blocked(read, rows, cols, block, kind, method)


def _blocked(read, rows: torch.Tensor, cols: torch.Tensor, block: int, kind: str, method: str) -> torch.Tensor:
    """Covariance (or correlation) between ``rows`` and ``cols`` examples from ``read(examples) -> [obs, b, K']``."""
    wanted = torch.unique(torch.cat([rows, cols]))
    mean, var = {}, {}
    for part in wanted.split(block):
        values = read(part)
        obs = len(values)
        for j, e in enumerate(part.tolist()):
            mean[e], var[e] = values[:, j].mean(0), values[:, j].var(0, unbiased=True)
    k = next(iter(mean.values())).numel()
    out = torch.empty(len(rows), len(cols), k, k, dtype=torch.float64)
    for a in range(0, len(rows), block):
        left = _centred(read(rows[a:a + block]), rows[a:a + block], mean)
        for b in range(0, len(cols), block):
            right = _centred(read(cols[b:b + block]), cols[b:b + block], mean)
            out[a:a + block, b:b + block] = torch.einsum("oik,ojl->ijkl", left, right) / (obs - 1)
    if kind == "correlation":
        sr = torch.stack([var[e] for e in rows.tolist()]).clamp(min=0).sqrt()  # [N1, K]
        sc = torch.stack([var[e] for e in cols.tolist()]).clamp(min=0).sqrt()
        out = out / (sr[:, None, :, None] * sc[None, :, None, :])
    return out[..., 0, 0] if method == "sequence" else out


def _centred(values: torch.Tensor, examples: torch.Tensor, mean: dict) -> torch.Tensor:
    return values - torch.stack([mean[e] for e in examples.tolist()]).unsqueeze(0)


__all__ = ["Influence", "KINDS", "METHODS", "REDUCTIONS", "compute_bif"]
