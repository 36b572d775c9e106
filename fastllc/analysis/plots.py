"""Pictures of circuits: every frequency's plane (learned ones highlighted) and the ablation curve."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .circuits import CircuitReport
from .fourier import FourierModes


def _figure(**kwargs):
    """A figure that draws to files only, through matplotlib's object API: neither pyplot's state nor the
    global backend of the caller's matplotlib is touched."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def plot_circuits(report: CircuitReport, modes: FourierModes, path: str | Path, title: str = "") -> Path:
    """A grid of per-frequency planes (tokens coloured by j·k mod p, joined in that order), the magnitude
    spectrum and the keep-only-k ablation curve, saved to ``path``."""
    p, K = modes.p, len(modes.frequencies)
    columns = min(K, 7)
    rows = math.ceil(K / columns)
    fig = _figure(figsize=(2.1 * columns, 2.1 * rows + 5.0))
    grid = fig.add_gridspec(rows + 2, columns, height_ratios=[1] * rows + [1.2, 1.2], hspace=0.6)
    tokens = np.arange(p)
    for index, k in enumerate(modes.frequencies):
        ax = fig.add_subplot(grid[index // columns, index % columns])
        order = np.argsort(tokens * k % p)
        xy = modes.coordinates[index]
        ax.plot(xy[order, 0], xy[order, 1], color="0.8", lw=0.6, zorder=1)
        ax.scatter(xy[:, 0], xy[:, 1], c=tokens * k % p, cmap="twilight", s=9, zorder=2)
        learned = int(k) in report.learned
        ax.set_title(f"k={k}  |·|={modes.magnitudes[index]:.1f}\nround {modes.roundness[index]:.2f} "
                     f"circ {modes.circularity[index]:.2f}", fontsize=7, color="C3" if learned else "0.3",
                     fontweight="bold" if learned else "normal")
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_aspect("equal", adjustable="datalim")
        for spine in ax.spines.values():
            spine.set_edgecolor("C3" if learned else "0.7")
            spine.set_linewidth(2.0 if learned else 0.6)
    colours = ["C3" if int(k) in report.learned else "0.6" for k in modes.frequencies]
    spectrum = fig.add_subplot(grid[rows, :])
    spectrum.bar(modes.frequencies, modes.magnitudes, color=colours)
    spectrum.set_ylabel("magnitude ‖(c_k, s_k)ᵀW‖")
    spectrum.set_xticks(modes.frequencies)
    spectrum.tick_params(labelsize=7)
    ablation = fig.add_subplot(grid[rows + 1, :])
    ablation.bar(modes.frequencies, report.ablation_test_loss, color=colours)
    ablation.axhline(math.log(p), color="0.3", ls=":", lw=1, label=f"chance, log p = {math.log(p):.2f}")
    ablation.axhline(report.full_test_loss, color="C0", ls="--", lw=1, label=f"full embedding {report.full_test_loss:.3f}")
    if report.learned_only_test_loss is not None:
        ablation.axhline(report.learned_only_test_loss, color="C3", ls="--", lw=1,
                         label=f"learned modes only {report.learned_only_test_loss:.3f}")
    ablation.set_xlabel("frequency k")
    ablation.set_ylabel("test loss, keeping only k")
    ablation.set_xticks(modes.frequencies)
    ablation.tick_params(labelsize=7)
    ablation.legend(fontsize=7, loc="lower right")
    fig.suptitle(title or f"p={p}: {report.count} learned circuit(s) {report.learned}", fontsize=11)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")  # a bare Figure needs no close: nothing else holds it
    return path
