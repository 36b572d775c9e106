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


def plot_calibration(result, path: str | Path, title: str = "") -> Path:
    """A calibration grid (``fastllc.calibration.CalibrationResult``) as a picture, saved to ``path``.

    Top row, one panel per γ: λ̂ ± se against ε (log axis), one line per nβ; a cell with diverged chains is a
    red ✕ (at its λ̂ if some chains survived, else on the panel's floor), a drifting or unmixed one a hollow
    marker, the recommended one a star. Bottom: the mean loss trace (healthy chains, as nβ·(L − L_n(w*)), the
    running λ̂ per step, smoothed over a fiftieth of the run) of the recommended cell and its neighbours in ε
    at the same nβ and γ, with the burn-in shaded."""
    cells = result.cells
    gammas = sorted({c.gamma for c in cells})
    nbetas = sorted({c.nbeta for c in cells})
    fig = _figure(figsize=(max(6.0, 4.2 * len(gammas)), 7.4))
    grid = fig.add_gridspec(2, len(gammas), height_ratios=[1.15, 1], hspace=0.38)
    top = [fig.add_subplot(grid[0, i]) for i in range(len(gammas))]
    finite = [c.llc_mean for c in cells if math.isfinite(c.llc_mean)]
    floor = min(finite) * 0.9 if finite and min(finite) > 0 else 0.0
    for ax, gamma in zip(top, gammas):
        for index, nbeta in enumerate(nbetas):
            row = sorted((c for c in cells if c.gamma == gamma and c.nbeta == nbeta), key=lambda c: c.epsilon)
            colour = f"C{index}"
            ok = [c for c in row if math.isfinite(c.llc_mean)]
            ax.errorbar([c.epsilon for c in ok], [c.llc_mean for c in ok],
                        yerr=[c.llc_se if math.isfinite(c.llc_se) else 0 for c in ok], color=colour, capsize=2,
                        lw=1, label=f"nβ = {nbeta:.4g}")
            for c in row:
                y = c.llc_mean if math.isfinite(c.llc_mean) else floor
                if "diverged" in c.flags:
                    ax.plot(c.epsilon, y, "x", color="C3", ms=9, mew=2)
                elif c.flags:
                    ax.plot(c.epsilon, y, "o", mfc="white", mec=colour, ms=7, mew=1.5)
                else:
                    ax.plot(c.epsilon, y, "o", color=colour, ms=5)
        chosen, band = result.recommended_cell, getattr(result, "interval", None)
        if chosen is not None and chosen.gamma == gamma:
            if band is not None:  # the 90% interval: standard error, step-size, drift and γ terms together
                ax.errorbar(chosen.epsilon, chosen.llc_mean, yerr=[[chosen.llc_mean - band.low],
                                                                   [band.high - chosen.llc_mean]],
                            color="goldenrod", lw=3, capsize=6, zorder=4, label="90% interval")
            ax.plot(chosen.epsilon, chosen.llc_mean, "*", color="gold", mec="k", ms=16, zorder=5, label="recommended")
        if not finite:  # nothing to place on a λ̂ axis: the ✕ marks sit on a line with no value
            ax.set_yticks([])
            ax.text(0.5, 0.6, "no λ̂: every chain diverged", transform=ax.transAxes, ha="center", color="C3")
        ax.set_xscale("log")
        ax.set_xlabel("ε")
        ax.set_ylabel("λ̂")
        ax.set_title(f"γ = {gamma:g}", fontsize=10)
        ax.plot([], [], "x", color="C3", mew=2, label="diverged")
        ax.plot([], [], "o", mfc="white", mec="0.3", label="drifting / unmixed")
        ax.legend(fontsize=7)
    traces = fig.add_subplot(grid[1, :])
    _plot_neighbour_traces(traces, result)
    kappa = getattr(result, "kappa", None)
    curvature = f", κ = {kappa:.3g} (step scale s = ε·nβ·κ)" if kappa else ""
    fig.suptitle(title or f"calibration: {len(cells)} cells × {result.chains} chains, {result.steps} steps{curvature}",
                 fontsize=11)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _plot_neighbour_traces(ax, result) -> None:
    """The recommended cell's and its ε-neighbours' mean traces, as running λ̂ per step (see plot_calibration)."""
    chosen = result.recommended
    if chosen is None or result.mean_traces is None:
        ax.text(0.5, 0.5, f"no recommended cell: {result.hint or result.reason}", ha="center", va="center",
                transform=ax.transAxes, fontsize=9, wrap=True)
        ax.set_axis_off()
        return
    c = result.cells[chosen]
    row = sorted((i for i, d in enumerate(result.cells) if d.gamma == c.gamma and d.nbeta == c.nbeta),
                 key=lambda i: result.cells[i].epsilon)
    at = row.index(chosen)
    width = max(1, result.steps // 50)
    kernel = np.ones(width) / width
    for i in row[max(0, at - 1): at + 2]:
        d = result.cells[i]
        trace = result.mean_traces[i]
        if not np.isfinite(trace).all():
            continue
        smooth = np.convolve(d.nbeta * (trace - result.init_loss), kernel, mode="valid")
        ax.plot(np.arange(len(smooth)) + width // 2, smooth, lw=2.2 if i == chosen else 1.1,
                label=f"ε = {d.epsilon:.3g}" + (" (recommended)" if i == chosen else "")
                + (f" [{', '.join(d.flags)}]" if d.flags else ""))
    ax.axvspan(0, result.burn_in, color="0.9", zorder=0, label="burn-in")
    ax.set_xlabel("step")
    ax.set_ylabel("nβ·(L_m − L_n(w*)), smoothed")
    ax.set_title(f"loss traces at nβ = {c.nbeta:.4g}, γ = {c.gamma:g} (mean over healthy chains)", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
