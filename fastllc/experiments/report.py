"""Tables and plots of a sweep directory, regenerated from its job JSONs alone."""

from __future__ import annotations

import io
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from .. import storage
from ..errors import FastLLCError
from .jobs import load_records


def _figure(**options):
    """A figure of its own (matplotlib's object API): pyplot's global backend and state stay untouched."""
    from matplotlib.figure import Figure

    return Figure(**options)


def _save(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    storage.write_atomically(path, buffer.getvalue())


def linear_fit(x, y) -> tuple[float, float, float]:
    """Least squares y ≈ slope·x + intercept over the finite points, and R² (NaN for fewer than three
    points: a line through two points fits them exactly, so its R² of 1 says nothing)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    finite = np.isfinite(x) & np.isfinite(y)
    x, y = x[finite], y[finite]
    if len(x) < 2 or np.ptp(x) == 0:
        return math.nan, math.nan, math.nan
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (slope * x + intercept)
    total = ((y - y.mean()) ** 2).sum()
    r2 = float(1 - (residual**2).sum() / total) if total > 0 and len(x) >= 3 else math.nan
    return float(slope), float(intercept), r2


def _fit(x, y, digits: int = 4, sep: str = " = ") -> tuple[float, float, str]:
    """``linear_fit`` with its R² as text, or why there is none (fewer than three points)."""
    slope, intercept, r2 = linear_fit(x, y)
    points = int((np.isfinite(np.asarray(x, float)) & np.isfinite(np.asarray(y, float))).sum())
    return slope, intercept, f"R² n/a: {points} points" if points < 3 else f"R²{sep}{_fmt(r2, digits)}"


def _by(records, key):
    groups = defaultdict(list)
    for r in records:
        groups[key(r)].append(r)
    return dict(sorted(groups.items()))


def _llc(record) -> float:
    value = record["result"]["llc_mean"]
    return math.nan if value is None else value


def _summary_rows(records):
    """Per p: mean and sd over seeds of λ̂, mean within-run standard error, count of seeds."""
    rows = []
    for p, group in _by(records, lambda r: r["training"]["p"]).items():
        values = np.array([_llc(r) for r in group])
        ses = np.array([r["result"]["llc_se"] or math.nan for r in group])
        rows.append(dict(p=p, mean=float(np.nanmean(values)), sd=float(np.nanstd(values, ddof=1)) if len(values) > 1 else math.nan,
                         se=float(np.nanmean(ses)), seeds=len(group), published=group[0].get("published"),
                         published_sd=group[0].get("published_sd"),
                         circuits=[r.get("circuit_count") for r in group], values=values.tolist()))
    return rows


def _fmt(x, digits=1):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


GENERALISED_TEST_ACCURACY = 0.99


def _generalised_only(records) -> list[str]:
    """The same fit over runs whose final test accuracy is ≥ 99%: λ̂ at a point that is not yet the
    generalising minimum is not the quantity the study's claim is about. Shown beside, never instead."""
    kept = [r for r in records if r.get("final_metrics", {}).get("test_acc", 0) >= GENERALISED_TEST_ACCURACY]
    rows = _summary_rows(kept)
    if len(kept) == len(records) or len(rows) < 2:
        return []
    slope, intercept, r2 = _fit([r["p"] for r in rows], [r["mean"] for r in rows])
    per_p = ", ".join(f"p = {r['p']}: {_fmt(r['mean'])} ({r['seeds']})" for r in rows)
    return ["", f"Runs that generalised (final test accuracy ≥ {GENERALISED_TEST_ACCURACY:.0%}), {len(kept)} of "
            f"{len(records)}: mean λ̂ (seeds) {per_p}; linear fit λ̂ ≈ {slope:.2f}·p {intercept:+.1f}, {r2}."]


def report_psweep(records, out: Path) -> list[str]:
    rows = _summary_rows(records)
    lines = ["### λ̂ against p (generalising networks)", "",
             "| p | λ̂ mean ± sd over seeds | within-run se | seeds | published (sd) | ours / published | circuits per seed |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r["mean"] / r["published"] if r["published"] else None
        pub = f"{_fmt(r['published'])} ({_fmt(r['published_sd'])})" if r["published"] else "–"
        lines.append(f"| {r['p']} | {_fmt(r['mean'])} ± {_fmt(r['sd'])} | {_fmt(r['se'], 2)} | {r['seeds']} | {pub} | "
                     f"{_fmt(ratio, 3)} | {r['circuits']} |")
    if len(rows) >= 2:
        slope, intercept, r2 = _fit([r["p"] for r in rows], [r["mean"] for r in rows])
        lines += ["", f"Linear fit of the means: λ̂ ≈ {slope:.2f}·p {intercept:+.1f}, {r2} "
                  f"(published: slope 8.60, intercept −90)."]
        lines += _generalised_only(records)
    fig = _figure(figsize=(6, 4.2))
    ax = fig.subplots()
    ps = np.array([r["p"] for r in rows])
    for r in rows:
        ax.scatter([r["p"]] * len(r["values"]), r["values"], color="C0", alpha=0.35, s=12)
    ax.errorbar(ps, [r["mean"] for r in rows], yerr=[r["sd"] if not math.isnan(r["sd"]) else 0 for r in rows],
                fmt="o", color="C0", capsize=3, label="fastllc: mean ± sd over seeds")
    published = [(r["p"], r["published"], r["published_sd"]) for r in rows if r["published"]]
    if published:
        pp, pv, psd = zip(*published)
        ax.errorbar(np.array(pp) + 0.4, pv, yerr=psd, fmt="s", color="C1", capsize=3, label="published")
    grid = np.linspace(0, ps.max() * 1.05, 50)
    ax.plot(grid, 4 * grid, ":", color="0.5", label="4p")
    ax.plot(grid, 8 * grid, "--", color="0.5", label="8p")
    ax.set_xlabel("p")
    ax.set_ylabel("λ̂")
    ax.legend(fontsize=8)
    ax.set_title("λ̂ of generalising networks against p")
    _save(fig, out / "psweep.png")
    lines += ["", "![λ̂ against p](psweep.png)", ""]
    return lines + report_circuits(records, out)


def report_circuits(records, out: Path) -> list[str]:
    """Learned circuits against λ̂ (the psweep's runs): does λ̂ depend on how many circuits a network has?"""
    counts = [(r["training"]["p"], r.get("circuit_count"), _llc(r)) for r in records if r.get("circuit_count") is not None]
    if not counts:
        return []
    lines = ["### circuits against λ̂", "", "| p | circuits | λ̂ |", "|---|---|---|"]
    lines += [f"| {p} | {c} | {_fmt(v)} |" for p, c, v in sorted(counts)]
    for p, group in _by(records, lambda r: r["training"]["p"]).items():
        values = [_llc(r) for r in group]
        kinds = sorted({r.get("circuit_count") for r in group} - {None})
        if len(kinds) > 1:
            spread = (max(values) - min(values)) / np.mean(values)
            means = ", ".join(f"{k}: {np.mean([_llc(r) for r in group if r.get('circuit_count') == k]):.0f}" for k in kinds)
            lines.append(f"\np = {p}: mean λ̂ by circuit count {{{means}}}; spread (max − min)/mean = {spread:.1%}")
    fig = _figure(figsize=(5.5, 4))
    ax = fig.subplots()
    for index, (p, group) in enumerate(_by(counts, lambda t: t[0]).items()):
        jitter = (index - 2.5) * 0.04
        ax.plot([c + jitter for _, c, _ in group], [v / p for _, _, v in group], "o", color=f"C{index}", label=f"p = {p}")
    ax.set_xticks(sorted({c for _, c, _ in counts}))
    ax.set_xlabel("learned circuits")
    ax.set_ylabel("λ̂ / p")
    ax.set_title("λ̂ (per unit p) against the number of circuits")
    ax.legend(fontsize=8)
    _save(fig, out / "circuits.png")
    return lines + ["", "![λ̂ against circuits](circuits.png)", ""]


def report_architectures(records, out: Path) -> list[str]:
    lines = ["### λ̂ by architecture", "", "| (e, h) | p | λ̂ mean ± sd (seeds) | published single run | ours / published |",
             "|---|---|---|---|---|"]
    fig = _figure(figsize=(6, 4.2))
    ax = fig.subplots()
    fits = []
    for index, ((e, h), group) in enumerate(_by(records, lambda r: (r["training"]["embed"], r["training"]["hidden"])).items()):
        rows = _summary_rows(group)
        for row in rows:
            ratio = row["mean"] / row["published"] if row["published"] else None
            lines.append(f"| ({e}, {h}) | {row['p']} | {_mean_sd(row)} | {_fmt(row['published'], 0)} | {_fmt(ratio, 3)} |")
        ps = [row["p"] for row in rows]
        ax.errorbar(ps, [row["mean"] for row in rows], yerr=[0 if math.isnan(row["sd"]) else row["sd"] for row in rows],
                    fmt="o-", color=f"C{index}", capsize=3, label=f"e = {e}, h = {h}")
        published = [(row["p"], row["published"]) for row in rows if row["published"]]
        if published:
            ax.plot(*zip(*published), "x", color=f"C{index}", ms=8)
        if len(rows) >= 2:
            slope, intercept, r2 = _fit(ps, [row["mean"] for row in rows], 3, " ")
            fits.append(f"({e}, {h}): slope {slope:.2f}, intercept {intercept:+.1f}, {r2}")
    ax.set_xlabel("p")
    ax.set_ylabel("λ̂")
    ax.set_title("λ̂ by architecture (× published single runs)")
    ax.legend(fontsize=8)
    _save(fig, out / "architectures.png")
    if fits:
        lines += ["", "Linear fits of the means: " + "; ".join(fits) + "."]
    return lines + ["", "![λ̂ by architecture](architectures.png)", ""]


MEMORISED_TRAIN_ACCURACY = 1.0


def _mean_sd(row) -> str:
    if row is None:
        return "–"
    return _fmt(row["mean"]) + (f" ± {_fmt(row['sd'])} ({row['seeds']})" if row["seeds"] > 1 else "")


def _quadratic_fit_line(rows: dict, label: str) -> list[str]:
    trusted = [(p, row["mean"]) for p, row in rows.items() if 10 <= p <= 25]
    if len(trusted) < 2:
        return []
    ps, values = zip(*trusted)
    a, c, r2 = _fit(np.array(ps) ** 2, values)
    return ["", f"{label}: fit over p ∈ [10, 25]: λ̂ ≈ {a:.3f}·p² {c:+.1f} ({r2}); the study's claim is a ≈ 0.8."]


def report_memorization(records, out: Path) -> list[str]:
    tasks = _by(records, lambda r: r["training"]["task"])
    lines = ["### memorisation against generalisation", "", "| p | λ̂ random operation (± sd, seeds) | published (e50 h200) | "
             "λ̂ modular addition | 0.8 p² |", "|---|---|---|---|---|"]
    memo = {row["p"]: row for row in _summary_rows(tasks.get("random", []))}
    gen = {row["p"]: row for row in _summary_rows(tasks.get("add", []))}
    for p in sorted(set(memo) | set(gen)):
        m, g = memo.get(p), gen.get(p)
        lines.append(f"| {p} | {_mean_sd(m)} | {_fmt(m['published'], 0) if m and m['published'] else '–'} | "
                     f"{_mean_sd(g)} | {0.8 * p * p:.0f} |")
    lines += _quadratic_fit_line(memo, "All runs")
    # λ̂ of a network that has not memorised its train set is not the claim's quantity: shown beside, never instead
    kept = [r for r in tasks.get("random", [])
            if r.get("final_metrics", {}).get("train_acc", 0) >= MEMORISED_TRAIN_ACCURACY]
    if 0 < len(kept) < len(tasks.get("random", [])):
        memorised = {row["p"]: row for row in _summary_rows(kept)}
        per_p = ", ".join(f"p = {p}: {_fmt(row['mean'])} ({row['seeds']})" for p, row in memorised.items())
        lines += ["", f"Runs that memorised (final train accuracy 100%), {len(kept)} of {len(tasks['random'])}: {per_p}."]
        lines += _quadratic_fit_line(memorised, "Runs that memorised")
    fig = _figure(figsize=(6, 4.2))
    ax = fig.subplots()
    for rows, style, colour, label in ((memo, "o-", "C0", "random operation (memorising)"),
                                       (gen, "s-", "C1", "modular addition (generalising, e=8, h=32)")):
        if not rows:
            continue
        for p, row in rows.items():  # every seed, faint
            ax.scatter([p] * len(row["values"]), row["values"], color=colour, alpha=0.35, s=12)
        ax.errorbar(list(rows), [r["mean"] for r in rows.values()],
                    yerr=[0 if math.isnan(r["sd"]) else r["sd"] for r in rows.values()], fmt=style, color=colour,
                    capsize=3, label=label + (": mean ± sd over seeds" if any(r["seeds"] > 1 for r in rows.values()) else ""))
    published = [(p, r["published"]) for p, r in memo.items() if r["published"]]
    if published:
        ax.plot(*zip(*published), "x", color="C3", ms=9, label="published (e50 h200)")
    grid = np.linspace(0, max(list(memo) + list(gen) + [1]) * 1.05, 50)
    ax.plot(grid, 0.8 * grid**2, "--", color="0.5", label="0.8 p² (train-set size)")
    ax.set_xlabel("p")
    ax.set_ylabel("λ̂")
    ax.legend(fontsize=8)
    _save(fig, out / "memorization.png")
    return lines + ["", "![memorisation](memorization.png)", ""]


def report_dynamics(records, out: Path) -> list[str]:
    fig = _figure(figsize=(7, 3.2 * len(records)))
    axes = fig.subplots(len(records), 1, squeeze=False)
    lines = ["### λ̂ along training", ""]
    for ax, record in zip(axes[:, 0], records):
        llc = [r["llc_mean"] for r in record["results"]]
        checkpoints = range(len(llc))
        ax.plot(checkpoints, llc, "o-", color="C0", label="λ̂")
        ax.set_xlabel("checkpoint")
        ax.set_ylabel("λ̂", color="C0")
        twin = ax.twinx()
        twin.plot(checkpoints, [m["train_loss"] for m in record["metrics"]], color="C1", label="train loss")
        twin.plot(checkpoints, [m["test_loss"] for m in record["metrics"]], color="C2", label="test loss")
        twin.set_ylabel("loss")
        twin.legend(fontsize=8, loc="center right")
        ax.set_title(f"p={record['training']['p']}, seed {record['training']['seed']}", fontsize=9)
        peak = int(np.nanargmax(np.array(llc, dtype=float)))
        lines.append(f"seed {record['training']['seed']}: λ̂ from {_fmt(llc[0])} at checkpoint 0 to a peak of "
                     f"{_fmt(llc[peak])} at checkpoint {peak}, {_fmt(llc[-1])} at the last; test loss "
                     f"{record['metrics'][0]['test_loss']:.2f} → {record['metrics'][-1]['test_loss']:.3f}")
    fig.tight_layout()
    _save(fig, out / "dynamics.png")
    return lines + ["", "![dynamics](dynamics.png)", ""]


def recommended(cell: dict, smaller: dict | None) -> bool:
    """On the plateau by ``fastllc.calibration``'s rule: the cell and the next smaller ε at the same γ and nβ
    both healthy, stationary and mixed, their λ̂ in agreement (``calibration.agree``). Reads the older
    records too (no ``drift``: the tenths' rule they were made with). The smallest ε of a row is never marked."""
    from ..calibration import agree

    return agree(cell, smaller)


def report_calibrate(records, out: Path) -> list[str]:
    from ..calibration import DRIFT_LIMIT, DRIFT_RELATIVE, R_HAT_LIMIT, cell_flags, recommend

    lines = ["### calibration grid", "",
             f"λ̂ per (ε, nβ, γ) cell (nβ as a multiple of n/log n); ✓ = on the plateau: this cell and the next "
             f"smaller ε healthy, stationary (no drift beyond {DRIFT_LIMIT:g} se that moves λ̂ more than "
             f"{DRIFT_RELATIVE:.0%}; drift is the z-score), split-R̂ ≤ {R_HAT_LIMIT}, and agreeing in λ̂; ★ = the "
             "recommended cell (`fastllc.calibration`'s rule)", ""]
    for record in records:
        cells = sorted(record["cells"], key=lambda c: (c["gamma"], c["nbeta"], c["epsilon"]))
        best, reason, hint = recommend(cells, default_nbeta=1.0)
        lines += [f"p = {record['training']['p']}, seed {record['training']['seed']}", "",
                  "| γ | nβ × n/log n | ε | λ̂ ± se | split-R̂ | ESS | healthy | drift | flags | |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        previous = {}
        for index, cell in enumerate(cells):
            row = (cell["gamma"], cell["nbeta"])
            mark = ("★ " if index == best else "") + ("✓" if recommended(cell, previous.get(row)) else "")
            previous[row] = cell
            lines.append(f"| {cell['gamma']:g} | {cell['nbeta']:g} | {cell['epsilon']:g} | {_fmt(cell['llc_mean'])} ± "
                         f"{_fmt(cell['llc_se'], 2)} | {_fmt(cell['r_hat'], 3)} | {_fmt(cell['ess'], 0)} | "
                         f"{cell['healthy_fraction']:.0%} | {_fmt(cell.get('drift'), 2)} | "
                         f"{', '.join(cell_flags(cell)) or '–'} | {mark.strip()} |")
        lines += ["", f"Recommended: {reason}." if best is not None else f"No recommendation: {hint}.", ""]
    return lines


REPORTS = {"psweep": report_psweep, "architectures": report_architectures, "memorization": report_memorization,
           "dynamics": report_dynamics, "calibrate": report_calibrate}


# fields each report reads beyond those every job record has (jobs.record_problem)
REPORT_FIELDS = {"psweep": (), "architectures": ("training.embed", "training.hidden"), "memorization": ("training.task",),
                 "dynamics": ("training.seed",), "calibrate": ("training.seed",)}


def _report_problem(record: dict) -> str | None:
    """Why a report cannot use ``record`` (an unknown sweep, a missing field), or None."""
    if record["sweep"] not in REPORTS:
        return f"unknown sweep {record['sweep']!r}"
    missing = [f for f in REPORT_FIELDS[record["sweep"]] if f.split(".")[1] not in record["training"]]
    return f"no {missing[0]!r} field" if missing else None


def write_report(out: str | Path) -> Path:
    """``<out>/report.md`` (and PNGs beside it) from every job JSON under ``<out>/jobs``; damaged or
    foreign JSONs are skipped with a warning, and none valid left is a one-line error."""
    out = Path(out)
    storage.remove_stale_temporaries(out)  # of a report write that crashed
    records = load_records(out, _report_problem)
    if not records:
        raise FastLLCError(f"{out} has no finished jobs to report (no valid {out / 'jobs'}/*.json)")
    lines = [f"# fastllc sweep report: {out}", ""]
    for sweep, group in _by(records, lambda r: r["sweep"]).items():
        try:
            lines += REPORTS[sweep](group, out)
        except (KeyError, TypeError, ValueError, IndexError) as err:  # a record edited by hand, or of an old schema
            if isinstance(err, FastLLCError):
                raise
            raise FastLLCError(f"the {sweep} records in {out / 'jobs'} do not have the fields the report needs "
                               f"({type(err).__name__}: {err}); move the damaged JSON aside and rerun") from None
    path = out / "report.md"
    storage.write_atomically(path, "\n".join(lines) + "\n")
    return path
