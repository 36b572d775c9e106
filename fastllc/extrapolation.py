"""λ̂ at zero step size: SGLD's discretisation bias removed by extrapolating λ̂(ε) to ε → 0, with an interval.

SGLD with step ε samples a distorted posterior: on a quadratic direction of curvature h its variance is
1/(nβ·h·(1 − ε·nβ·h/4)) instead of 1/(nβ·h) (the Euler–Maruyama invariant measure), and minibatch gradients
add variance ∝ ε as well, so to first order λ̂(ε) = λ̂(0) + b·ε with b ≥ 0 (Mattingly, Stuart & Tretyakov
2010: the invariant measure's bias is O(ε) for Euler schemes; Vollmer, Zygalakis & Teh 2016 for SGLD). Given
cells at several ε that are stationary and local (``calibration.usable``), ``zero_step`` fits that line by
weighted least squares (weights 1/se²) and reports the intercept:

- slope b < 0 is not a bias SGLD has (it comes from noise or from cells that have not mixed): the fit is
  then the weighted mean (b = 0), said in ``method``;
- the intercept's standard error is the fit's, scaled up by √(χ²/dof) when the points scatter more than their
  standard errors allow (dof ≥ 1);
- one usable cell: its λ̂ as it is, and ``method`` says the bias was not removed.

The interval (``low``, ``high``) is intercept ± z·√(se² + spread²), z = 1.645 (90%), where ``spread`` is the
standard deviation of the intercepts of the other γ rows that agree with the chosen one within two combined
standard errors (λ̂ flat in γ: their differences are the localisation's uncertainty); it covers what the
cells measure, not the finite-n gap between E_β[nβ·ΔL] and λ.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import numpy as np

Z90 = 1.6448536269514722  # two-sided 90% normal quantile


@dataclass
class ZeroStepEstimate:
    """λ̂ extrapolated to ε → 0 from one row of cells (same nβ, γ), with its uncertainty."""

    llc: float
    se: float  # standard error of the intercept (fit and Monte Carlo)
    low: float  # the 90% interval: llc ± Z90·√(se² + gamma_spread²)
    high: float
    slope: float  # dλ̂/dε of the fit (0 when the fit was constrained)
    gamma_spread: float
    cells: list = field(default_factory=list)  # indices of the cells fitted
    method: str = ""

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


def fit_line(epsilons: Sequence[float], llcs: Sequence[float], ses: Sequence[float]) -> tuple[float, float, float, str]:
    """(intercept, its se, slope, method) of λ̂ = a + b·ε weighted by 1/se², with b ≥ 0 (see the module)."""
    x, y, se = (np.asarray(v, dtype=float) for v in (epsilons, llcs, ses))
    se = np.where(np.isfinite(se) & (se > 0), se, np.nanmax(np.where(np.isfinite(se), se, 0)) or 1.0)
    w = 1 / se**2
    if len(x) == 1:
        return float(y[0]), float(se[0]), 0.0, "one usable cell: λ̂ at that ε, discretisation bias not removed"
    design = np.stack([np.ones_like(x), x], axis=1)
    covariance = np.linalg.inv(design.T @ (design * w[:, None]))
    a, b = covariance @ (design.T @ (w * y))
    method = f"linear fit over {len(x)} cells"
    if b < 0:
        mean_var = 1 / w.sum()
        a, b, covariance = (w * y).sum() * mean_var, 0.0, np.array([[mean_var, 0.0], [0.0, 0.0]])
        method = f"weighted mean of {len(x)} cells (the fitted slope was negative, which SGLD's bias is not)"
    dof = len(x) - (2 if b > 0 else 1)
    chi2 = float((w * (y - a - b * x) ** 2).sum())
    scale = max(1.0, chi2 / dof) if dof >= 1 else 1.0
    return float(a), float(math.sqrt(covariance[0, 0] * scale)), float(b), method


def zero_step(cells: Sequence[Mapping], rows: Mapping[float, Sequence[int]], chosen: float) -> ZeroStepEstimate:
    """The ε → 0 estimate of row ``chosen`` (a γ value) from ``rows`` {γ: indices of usable cells}; the other
    rows' intercepts give the γ spread."""
    intercepts = {}
    for gamma, members in rows.items():
        if members:
            points = [(cells[i]["epsilon"], cells[i]["llc_mean"], cells[i]["llc_se"]) for i in members]
            intercepts[gamma] = fit_line(*zip(*points))
    llc, se, slope, method = intercepts[chosen]
    flat = [a for g, (a, s, _, _) in intercepts.items()
            if g == chosen or abs(a - llc) <= 2 * math.sqrt(s**2 + se**2)]
    spread = float(np.std(flat, ddof=1)) if len(flat) > 1 else 0.0
    half = Z90 * math.sqrt(se**2 + spread**2)
    return ZeroStepEstimate(llc=llc, se=se, low=llc - half, high=llc + half, slope=slope, gamma_spread=spread,
                            cells=list(rows[chosen]), method=method)
