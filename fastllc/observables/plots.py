"""Pictures of observables: the susceptibility heatmap (restriction × probe set or token class) and an influence
matrix.

Both draw through matplotlib's object API (a bare ``Figure``: pyplot's state and the caller's backend are left
alone) and write a PNG.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .bif import Influence
from .susceptibilities import Susceptibilities


def _figure(**kwargs):
    from matplotlib.figure import Figure
    return Figure(**kwargs)


def plot_susceptibilities(result: Susceptibilities, path, *, include_task: bool = False, title: str = "",
                          by: str = "set") -> Path:
    """Heatmap of χ per restriction (rows) and probe set (columns; ``by="class"``: token class, from
    ``compute_susceptibilities(..., classes=...)``), each cell "χ ± se", a diverging scale centred at 0 (blue:
    χ < 0, up-weighting the probe lowers the component's loss; red: raises it)."""
    names, values, errors = (t if isinstance(t, list) else t.numpy() for t in result.columns(by, include_task))
    limit = (float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 0.0) or 1.0  # an empty class: NaN
    fig = _figure(figsize=(1.6 + 1.5 * len(names), 1.0 + 0.55 * len(result.restrictions)))
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    for g in range(values.shape[0]):
        for c in range(values.shape[1]):
            strong = abs(values[g, c]) > 0.6 * limit
            ax.text(c, g, f"{values[g, c]:+.3g}\n± {errors[g, c]:.2g}", ha="center", va="center", fontsize=8,
                    color="white" if strong else "black")
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(result.restrictions)), result.restrictions)
    ax.set_xlabel(f"probe set (task: {result.task})" if by == "set" else f"token class (task: {result.task})")
    ax.set_ylabel("weight restriction")
    ax.set_title(title or f"susceptibility χ ({result.estimator} estimator)")
    label = "χ = −Cov(φ, ℓ_probe − L_task)" if by == "set" else "χ = −Cov(φ, ℓ_class − L_task)"
    fig.colorbar(image, ax=ax, label=label)
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def plot_influence(result: Influence, path, *, title: str = "") -> Path:
    """The influence matrix (token method: averaged over token pairs), probe sets separated by lines."""
    values = result.per_sequence().numpy()
    fig = _figure(figsize=(6.0, 5.0))
    ax = fig.add_subplot()
    limit = float(np.nanmax(np.abs(values))) or 1.0
    image = ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit)
    labels_r = [result.labels[i] for i in result.rows.tolist()]
    labels_c = [result.labels[i] for i in result.cols.tolist()]
    if len(labels_r) <= 40:
        ax.set_yticks(range(len(labels_r)), labels_r, fontsize=6)
    if len(labels_c) <= 40:
        ax.set_xticks(range(len(labels_c)), labels_c, fontsize=6, rotation=90)
    ax.set_title(title or f"BIF: {result.kind} ({result.method}, chains {result.chains}, {result.restriction})")
    fig.colorbar(image, ax=ax)
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


__all__ = ["plot_influence", "plot_susceptibilities"]
