"""Tables and plots of a sweep directory, regenerated from its job JSONs alone. The study's targets and
their verdicts (which runs count, the published figures, the tolerances) are ``targets``'; this module
only renders them."""

from __future__ import annotations

import io
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from .. import storage
from ..errors import FastLLCError
from . import targets
from .jobs import load_records

# the targets' figures as the report writes them
_GENERALISED = f"{targets.GENERALISED_TEST_ACCURACY:.0%}"  # "99%"
_MEMORISED = f"{targets.MEMORISED_TRAIN_ACCURACY:.0%}"  # "100%"
_CLAIM = f"{targets.MEMORISATION_CLAIM['a']:g} p²"  # "0.8 p²": the memorisation claim as the report writes it
_CLAIM_PS = "[{}, {}]".format(*targets.MEMORISATION_CLAIM["ps"])  # "[10, 25]": the p over which it is fitted


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
        rows.append(dict(p=p, mean=_mean(values), sd=_sd(values, 1), se=_mean(ses), seeds=len(group), published=group[0].get("published"),
                         published_sd=group[0].get("published_sd"),
                         circuits=[r.get("circuit_count") for r in group], values=values.tolist()))
    return rows


def _fmt(x, digits=1):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _mean(values) -> float:
    """Mean of the finite values; NaN when there is none (every job diverged), without numpy's warning."""
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else math.nan


def _sd(values, ddof: int) -> float:
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    return float(np.std(values, ddof=ddof)) if len(values) > ddof else math.nan


def chain_loss_of(record) -> str:
    """The SGLD chain loss of a job; a JSON written before chain losses could vary used the exact one."""
    return record.get("sgld", {}).get("chain_loss", "exact")


def settings_label(record) -> str:
    """The settings a job's λ̂ depends on beyond p and the network, in words: jobs are grouped and labelled by
    it, so that no variant is averaged with another. Read from the record itself (old JSONs included)."""
    sgld, training = record.get("sgld", {}), record["training"]
    parts = ["+1e-6 chain loss (as published)" if chain_loss_of(record) == "published" else "exact chain loss"]
    if "orthogonal" in sgld:
        parts.append(f"orthogonal {'on' if sgld['orthogonal'] else 'off'}")
    if training.get("init_scale", 1) != 1:
        parts.append(f"init ×{training['init_scale']:g}")
    if record.get("batch_order") == "study":  # examples/study_replica.py: the study's split and minibatches replayed
        parts.append("the study's own split and minibatch order")
    else:
        parts.append("one split per p" if training.get("split") == "fixed" else "a split per seed")
    if record.get("batch_order") == "shared":  # every seed trained on seed 0's minibatches (the study's data order)
        parts.append("one batch order per p")
    for name, symbol, study in (("gamma", "γ", targets.STUDY_GAMMA), ("epsilon", "ε", targets.STUDY_EPSILON)):
        if isinstance(sgld.get(name), (int, float)) and sgld[name] != study:
            parts.append(f"{symbol} = {sgld[name]:g}")
    return ", ".join(parts)


# the networks the memorisation claim compares (the random operation's, the modular addition's beside it)
CLAIM_NETWORKS = {(50, 200), (8, 32)}


def network_tag(record) -> str:
    """"" for the memorisation claim's networks (e50/h200, and e8/h32 beside them), else "e16/h64 on both
    tasks": a memorisation record's network, so that another network is never averaged with the claim's."""
    training = record["training"]
    if "embed" not in training:  # a record that does not say: the claim's
        return ""
    e, h = training["embed"], training.get("hidden", 32)
    return "" if (e, h) in CLAIM_NETWORKS else f"e{e}/h{h} on both tasks"


def memorization_label(record) -> str:
    """``settings_label`` and, where it is not the claim's, the network (``network_tag``)."""
    tag = network_tag(record)
    return settings_label(record) + (f"; {tag}" if tag else "")


def _variant_groups(records, label=settings_label) -> list[tuple[str, list]]:
    """Records grouped by ``label`` (``settings_label``), the group holding the "published" variant's jobs first."""
    groups = _by(records, label)
    def order(item):
        label, group = item
        return (0 if any(r.get("variant") == "published" for r in group) else 1, label)
    return sorted(groups.items(), key=order)


def _png(base: str, index: int, group, label=settings_label) -> str:
    """The first (published) group's plot keeps the sweep's plain name; the others get their variant's."""
    if index == 0:
        return f"{base}.png"
    tag = label(group[0]).replace("γ", "gamma").replace("ε", "eps")
    return f"{base}-{''.join(c if c.isascii() and c.isalnum() else '-' for c in tag).strip('-').lower()}.png"


def _heading(label: str, group) -> list[str]:
    return [f"#### settings: {label}", ""]


NOT_RECORDED = "not recorded"


def record_locality(record) -> tuple[float | None, str]:
    """(locality, where it came from) of a final job's chains: the record's own ``locality`` field (jobs
    since job records carry it), else computed here from the fields an older record has (its mean sampled loss and
    L_n(w*): ``jobs.chain_locality``), else (None, "not recorded")."""
    from .jobs import chain_locality

    if record.get("locality") is not None:
        return float(record["locality"]), "recorded"
    value = chain_locality(record.get("result") or {}, record["training"]["p"])["locality"]
    return (None, NOT_RECORDED) if value is None else (value, "computed by the report")


def is_nonlocal(record) -> bool | None:
    """``calibration``'s "nonlocal" flag for a job's chains (locality > ½); None when not recorded."""
    from ..calibration import LOCALITY_LIMIT

    value, _ = record_locality(record)
    return None if value is None else value > LOCALITY_LIMIT


def relative_drift(record) -> float | None:
    """(mean loss of the last tenth − of the first tenth) / (mean loss − L_n(w*)): how far the chains' loss
    still moved, as a share of the loss excess λ̂ = nβ·ΔL measures (the records keep tenths, not fifths)."""
    result = record.get("result") or {}
    summary = result.get("loss_trace_summary") or {}
    first, last, mean = (summary.get(k) for k in ("first_tenth_mean_loss", "last_tenth_mean_loss", "mean_loss"))
    init = result.get("init_loss")
    if None in (first, last, mean, init) or mean - init <= 0:
        return None
    return (last - first) / (mean - init)


def _drifting(record) -> bool | None:
    from ..calibration import DRIFT_RELATIVE

    drift = relative_drift(record)
    return None if drift is None else abs(drift) > DRIFT_RELATIVE


def locality_table(records, key, key_names: str, key_text) -> list[str]:
    """Per ``key`` (e.g. p): the chains' mean sampled loss, L_n(w*), the trivial loss log p, locality
    (flagged "nonlocal" above ½, as ``fastllc.calibration`` does), λ̂/n and λ̂/p², and the drift of the mean
    loss between the first and last tenth (flagged above 10%, ``calibration.DRIFT_RELATIVE``)."""
    from ..calibration import DRIFT_RELATIVE, LOCALITY_LIMIT
    from ..tasks import train_size

    lines = [f"| {key_names} | seeds | mean sampled loss | L_n(w*) | log p | locality (min–max) | nonlocal (> {LOCALITY_LIMIT:g}) "
             f"| λ̂/n | λ̂/p² | drift / (λ̂/nβ) (max) | drifting (> {DRIFT_RELATIVE:.0%}) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    sources = set()
    for k, group in _by(records, key).items():
        p = group[0]["training"]["p"]
        localities = [record_locality(r) for r in group]
        sources |= {source for _, source in localities}
        values = [v for v, _ in localities if v is not None]
        means = [(r.get("result") or {}).get("loss_trace_summary", {}).get("mean_loss") for r in group]
        inits = [(r.get("result") or {}).get("init_loss") for r in group]
        flags = [is_nonlocal(r) for r in group]
        drifts = [d for d in map(relative_drift, group) if d is not None]
        drifting = [d for d in map(_drifting, group) if d is not None]
        llc = [_llc(r) for r in group]
        n = [train_size(p, r["training"].get("train_frac", 0.8)) for r in group]
        per_n = _mean([v / m for v, m in zip(llc, n)])
        locality = (f"{_fmt(_mean(values), 2)} ({_fmt(min(values), 2)}–{_fmt(max(values), 2)})" if values else NOT_RECORDED)
        nonlocal_ = f"{sum(f for f in flags if f)} of {sum(f is not None for f in flags)}" if values else NOT_RECORDED
        lines.append(f"| {key_text(k)} | {len(group)} | {_fmt(_mean([m for m in means if m is not None]), 2)} | "
                     f"{_fmt(_mean([i for i in inits if i is not None]), 3)} | {math.log(p):.2f} | {locality} | {nonlocal_} | "
                     f"{_fmt(per_n, 2)} | {_fmt(_mean(llc) / p**2, 2)} | "
                     f"{_fmt(_mean(drifts), 3)} ({_fmt(max(drifts, key=abs) if drifts else None, 3)}) | "
                     f"{sum(drifting)} of {len(drifting)} |")
    flagged = sum(bool(is_nonlocal(r)) for r in records)
    known = sum(is_nonlocal(r) is not None for r in records)
    where = ", ".join(sorted(sources))
    return ["", f"Locality of the chains (each job's own chains; locality = (mean sampled loss − L_n(w*)) / (log p − "
            f"L_n(w*)), the trivial predictor the uniform one; {where}): {flagged} of {known} jobs nonlocal "
            f"(> {LOCALITY_LIMIT:g}: λ̂ = nβ·ΔL then measures the temperature, not the geometry at w*)"
            + (f"; {len(records) - known} not recorded" if known < len(records) else "") + ".", ""] + lines


def _generalised_only(records) -> list[str]:
    """The same fit over runs whose final test accuracy is ≥ 99%: λ̂ at a point that is not yet the
    generalising minimum is not the quantity the study's claim is about. Shown beside, never instead."""
    kept = [r for r in records if targets.generalised(r)]
    rows = _summary_rows(kept)
    if len(kept) == len(records) or len(rows) < 2:
        return []
    slope, intercept, r2 = _fit([r["p"] for r in rows], [r["mean"] for r in rows])
    per_p = ", ".join(f"p = {r['p']}: {_fmt(r['mean'])} ({r['seeds']})" for r in rows)
    return ["", f"Runs that generalised (final test accuracy ≥ {_GENERALISED}), {len(kept)} of "
            f"{len(records)}: mean λ̂ (seeds) {per_p}; linear fit λ̂ ≈ {slope:.2f}·p {intercept:+.1f}, {r2}."]


def report_psweep(records, out: Path) -> list[str]:
    lines = ["### λ̂ against p", ""]
    for index, (label, group) in enumerate(_variant_groups(records)):
        lines += _heading(label, group) + _psweep_group(group, out, _png("psweep", index, group))
        if index == 0:
            lines += report_circuits(group, out)
    return lines


def _psweep_group(records, out: Path, png: str) -> list[str]:
    rows = _summary_rows(records)
    by_p = _by(records, lambda r: r["training"]["p"])
    lines = ["| p | λ̂ mean ± sd over seeds | within-run se | seeds | published (sd) | ours / published | circuits per seed "
             f"| sd ddof 1 / ddof 0 | converged (test acc ≥ {_GENERALISED}) | batches |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r["mean"] / r["published"] if r["published"] else None
        pub = f"{_fmt(r['published'])} ({_fmt(r['published_sd'])})" if r["published"] else "–"
        group = by_p[r["p"]]
        batches = sorted({g["training"].get("batches") for g in group} - {None})
        lines.append(f"| {r['p']} | {_fmt(r['mean'])} ± {_fmt(r['sd'])} | {_fmt(r['se'], 2)} | {r['seeds']} | {pub} | "
                     f"{_fmt(ratio, 3)} | {r['circuits']} | {_fmt(_sd(r['values'], 1))} / {_fmt(_sd(r['values'], 0))} | "
                     f"{sum(map(targets.generalised, group))} of {len(group)} | {', '.join(map(str, batches)) or '–'} |")
    converged = sum(map(targets.generalised, records))
    if converged == 0:  # the study's claim is about generalising networks: say plainly these are not
        lines += ["", f"None of the {len(records)} runs generalised (final test accuracy ≥ "
                  f"{_GENERALISED}): this λ̂ is not that of generalising networks; train longer "
                  "(more batches) for the study's quantity."]
    finite = sum(1 for r in rows if math.isfinite(r["mean"]))
    if len(rows) >= 2 and finite < 2:
        lines += ["", f"No linear fit: {finite} of {len(rows)} p have a finite λ̂ (the others' jobs kept no healthy chain)."]
    elif len(rows) >= 2:
        slope, intercept, r2 = _fit([r["p"] for r in rows], [r["mean"] for r in rows])
        lines += ["", f"Linear fit of the means: λ̂ ≈ {slope:.2f}·p {intercept:+.1f}, {r2} "
                  f"(published: slope {_published_fit()})."]
        ps, values = [r["training"]["p"] for r in records], [_llc(r) for r in records]
        all_slope, all_intercept, all_r2 = _fit(ps, values)
        lines += [f"Fit over all {len(records)} runs: λ̂ ≈ {all_slope:.2f}·p {all_intercept:+.1f}, {all_r2}."]
        lines += _psweep_targets(rows, all_slope, linear_fit(ps, values)[2])
        lines += _generalised_only(records)
    lines += _unconverged_lines(by_p)
    lines += _spread_against_published(by_p)
    lines += locality_table(records, lambda r: r["training"]["p"], "p", str)
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
    kind = "generalising networks" if converged == len(records) else f"{converged} of {len(records)} runs generalised"
    ax.set_title(f"λ̂ against p ({kind})\n{settings_label(records[0])}", fontsize=9)
    _save(fig, out / png)
    return lines + ["", f"![λ̂ against p]({png})", ""]


def _published_fit() -> str:
    """The published fit of the p-sweep's means, as the report writes it: "8.60, intercept −90"."""
    fit = targets.PUBLISHED_PSWEEP_FIT
    return f"{fit['slope']:.2f}, intercept {fit['intercept']:g}".replace("-", "−")


def _met(ok: bool) -> str:
    return "met" if ok else "not met"


def _psweep_targets(rows, slope: float, r2_all: float) -> list[str]:
    """The p-sweep's targets (``targets.psweep_verdict``), each with its number: met or not."""
    verdict = targets.psweep_verdict(rows, slope, r2_all)
    if verdict is None:
        return []
    goals = targets.PSWEEP_TARGETS
    target, width = goals["slope"]
    return [f"Targets: every mean within {goals['mean_within']:.0%} of the published one: "
            f"{_met(verdict['means_met'])} (largest difference {verdict['worst']:+.1%} at p = {verdict['worst_p']}); "
            f"slope {target} ± {width}: {_met(verdict['slope_met'])} ({slope:.2f}); "
            f"R² ≥ {goals['r2']} over all runs: {_met(verdict['r2_met'])} ({_fmt(r2_all, 4)})."]


def _unconverged_lines(by_p) -> list[str]:
    """Per p with runs short of 99% test accuracy: how many converged, and λ̂ of each kind; and, where there
    are more seeds than the study's five, the first five's mean and population sd (the published basis)."""
    lines = []
    for p, group in by_p.items():
        done = [_llc(r) for r in group if targets.generalised(r)]
        short = [(r["training"].get("seed"), _llc(r), r.get("final_metrics", {}).get("test_acc")) for r in group
                 if not targets.generalised(r)]
        if short:
            each = ", ".join(f"seed {seed}: {_fmt(v)} (test acc {_fmt(100 * acc if acc is not None else None)}%)"
                             for seed, v, acc in short)
            lines.append(f"p = {p}: {len(done)} of {len(group)} runs converged (convergence rate {len(done) / len(group):.0%}); "
                         f"λ̂ of the converged runs {_fmt(np.mean(done) if done else None)} ± {_fmt(_sd(done, 1))}; "
                         f"of the others {each}.")
        seeds = sorted(group, key=lambda r: r["training"].get("seed", 0))
        if len(seeds) > 5 and seeds[0].get("published") is not None:
            first = [_llc(r) for r in seeds[:5]]
            lines.append(f"p = {p}, seeds 0–4 only (the study's count of runs): mean {_fmt(np.mean(first))}, sd "
                         f"{_fmt(_sd(first, 0))} (ddof 0, the published basis) / {_fmt(_sd(first, 1))} (ddof 1); "
                         f"published {_fmt(seeds[0]['published'])} ({_fmt(seeds[0].get('published_sd'))}).")
    return [""] + lines if lines else []


STUDY_RUNS = 5  # runs per p behind each published mean and sd


def _spread_against_published(by_p) -> list[str]:
    """The seed spread against the published one: at each p with a published sd, the population sd of the first
    five seeds (the published basis) over the published sd; pooled over those p, the variance ratio (ddof 1,
    4 degrees of freedom per p on both sides) and its one-sided F-test p-value (equal spreads as the null)."""
    ratios, ours, theirs = [], [], []
    for p, group in by_p.items():
        published_sd = group[0].get("published_sd")
        first = [_llc(r) for r in sorted(group, key=lambda r: r["training"].get("seed", 0))[:STUDY_RUNS]]
        if not published_sd or len(first) < STUDY_RUNS or not all(math.isfinite(v) for v in first):
            continue
        ratios.append(f"{_sd(first, 0) / published_sd:.1f} (p = {p})")
        ours.append(_sd(first, 1) ** 2)
        theirs.append(published_sd**2 * STUDY_RUNS / (STUDY_RUNS - 1))
    if len(ours) < 2:
        return []
    ratio, df = float(np.mean(ours) / np.mean(theirs)), (STUDY_RUNS - 1) * len(ours)
    return ["", f"Seed spread against the published (first {STUDY_RUNS} seeds of each p, population sd as published): "
            f"{', '.join(ratios)} times the published sd; pooled over {len(ours)} p, variance ratio {ratio:.2f} "
            f"(sd ratio {math.sqrt(ratio):.2f}), F-test on ({df}, {df}) df: one-sided p = {_fmt(f_upper_tail(ratio, df, df), 3)}."]


def f_upper_tail(f: float, d1: int, d2: int) -> float:
    """P(F ≥ f) for F(d1, d2) with even d1 and d2 (exact: a finite binomial sum of the incomplete beta
    function); NaN for odd degrees of freedom."""
    if d1 % 2 or d2 % 2 or f < 0:
        return math.nan
    a, b = d1 // 2, d2 // 2
    x = d1 * f / (d1 * f + d2)  # P(F ≤ f) = I_x(a, b) = P(Binomial(a + b − 1, x) ≥ a)
    below = sum(math.comb(a + b - 1, j) * x**j * (1 - x) ** (a + b - 1 - j) for j in range(a, a + b))
    return 1.0 - below


def report_circuits(records, out: Path) -> list[str]:
    """Learned circuits against λ̂ (the psweep's runs): does λ̂ depend on how many circuits a network has?"""
    counts = [(r["training"]["p"], r.get("circuit_count"), _llc(r)) for r in records if r.get("circuit_count") is not None]
    if not counts:
        return []
    lines = ["### circuits against λ̂", "", f"Settings: {settings_label(records[0])}.", ""]
    lines += _circuit_rule_lines(records)
    lines += ["| p | circuits | λ̂ |", "|---|---|---|"]
    lines += [f"| {p} | {c} | {_fmt(v)} |" for p, c, v in sorted(counts)]
    at_53 = sorted((r["training"].get("seed", 0), r.get("circuit_count")) for r in records
                   if r["training"]["p"] == 53 and r.get("circuit_count") is not None)
    if at_53:
        lines.append(f"\np = 53: circuits of seeds {', '.join(str(s) for s, _ in at_53)}: "
                     f"{', '.join(str(c) for _, c in at_53)}; the authors' recorded counts for their five p = 53 runs: "
                     f"{', '.join(map(str, targets.AUTHORS_CIRCUITS_P53))} (the post's '4–7' does not describe these networks).")
    for p, group in _by(records, lambda r: r["training"]["p"]).items():
        values = [_llc(r) for r in group]
        kinds = sorted({r.get("circuit_count") for r in group} - {None})
        if len(kinds) > 1 and all(math.isfinite(v) for v in values):  # a diverged job has no λ̂ to compare
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
    ax.set_title(f"λ̂ (per unit p) against the number of circuits\n{settings_label(records[0])}", fontsize=9)
    ax.legend(fontsize=8)
    _save(fig, out / "circuits.png")
    return lines + ["", "![λ̂ against circuits](circuits.png)", ""]


def _circuit_rule_lines(records) -> list[str]:
    """Which rule counted each record's circuits, and every count that the plane-of-its-own rule
    (``analysis.circuits``) changed: a record re-counted keeps the earlier count in ``circuits_rules_1_2``."""
    counted = [r for r in records if r.get("circuit_count") is not None]
    recounted = [r for r in counted if "circuit_rule" in r]
    lines = []
    if recounted:
        lines.append(f"Counted by `analysis.circuits`' rule: {recounted[0]['circuit_rule']} ({len(recounted)} of "
                     f"{len(counted)} runs re-counted from their retrained networks).")
    if len(recounted) < len(counted):
        lines.append(f"{len(counted) - len(recounted)} of {len(counted)} counts are by the earlier rule (outlier "
                     "magnitude and roundness only), which can exceed what the embedding holds (e/2 planes).")
    changed = [r for r in recounted if r["circuits_rules_1_2"] != r["circuits"]]
    for r in sorted(changed, key=lambda r: (r["training"]["p"], r["training"].get("seed", 0))):
        lines.append(f"- re-counted: p = {r['training']['p']} seed {r['training'].get('seed')}: "
                     f"{len(r['circuits_rules_1_2'])} {r['circuits_rules_1_2']} → {r['circuit_count']} {r['circuits']}.")
    if recounted and not changed:
        lines.append("No count changed.")
    if changed:  # a list of its own: a blank line before it
        first = lines.index(next(line for line in lines if line.startswith("- re-counted")))
        lines.insert(first, "")
    return lines + [""] if lines else []


def report_architectures(records, out: Path) -> list[str]:
    lines = ["### λ̂ by architecture", ""]
    for index, (label, group) in enumerate(_variant_groups(records)):
        lines += _heading(label, group) + _architectures_group(group, out, _png("architectures", index, group))
    return lines


def _architectures_group(records, out: Path, png: str) -> list[str]:
    lines = ["| (e, h) | p | λ̂ mean ± sd (seeds) | published single run | ours / published | "
             f"converged (test acc ≥ {_GENERALISED}) |",
             "|---|---|---|---|---|---|"]
    fig = _figure(figsize=(6, 4.2))
    ax = fig.subplots()
    fits, rows_by_network = [], {}
    for index, ((e, h), group) in enumerate(_by(records, lambda r: (r["training"]["embed"], r["training"]["hidden"])).items()):
        rows = rows_by_network[(e, h)] = _summary_rows(group)
        by_p = _by(group, lambda r: r["training"]["p"])
        for row in rows:
            ratio = row["mean"] / row["published"] if row["published"] else None
            lines.append(f"| ({e}, {h}) | {row['p']} | {_mean_sd(row)} | {_fmt(row['published'], 0)} | {_fmt(ratio, 3)} | "
                         f"{sum(map(targets.generalised, by_p[row['p']]))} of {row['seeds']} |")
        ps = [row["p"] for row in rows]
        ax.errorbar(ps, [row["mean"] for row in rows], yerr=[0 if math.isnan(row["sd"]) else row["sd"] for row in rows],
                    fmt="o-", color=f"C{index}", capsize=3, label=f"e = {e}, h = {h}")
        published = [(row["p"], row["published"]) for row in rows if row["published"]]
        if published:
            ax.plot(*zip(*published), "x", color=f"C{index}", ms=8)
        if len(rows) >= 2:
            fits.append(_architecture_fit(e, h, rows))
    ax.set_xlabel("p")
    ax.set_ylabel("λ̂")
    ax.set_title(f"λ̂ by architecture (× published single runs)\n{settings_label(records[0])}", fontsize=9)
    ax.legend(fontsize=8)
    _save(fig, out / png)
    if fits:
        lines += ["", "Linear fits of the means: " + "; ".join(fits) + "."]
    verdict = targets.architectures_verdict(rows_by_network)
    if verdict is not None:
        goal = targets.ARCHITECTURES_TARGET
        each = ", ".join(f"p = {p}: {d:+.1%}" for p, d in verdict["differences"])
        met, primes = _met(verdict["met"]), " and ".join(map(str, goal["primes"]))
        lines += ["", f"Target: {goal['network']} at p = {primes} within {goal['within']:.0%} of the published "
                  f"single runs: {met} ({each})."]
    lines += locality_table(records, lambda r: (r["training"]["embed"], r["training"]["hidden"], r["training"]["p"]),
                            "(e, h), p", lambda k: f"({k[0]}, {k[1]}), {k[2]}")
    return lines + ["", f"![λ̂ by architecture]({png})", ""]


def _architecture_fit(e: int, h: int, rows) -> str:
    """One network's linear fit of the means, beside the fit of the published single runs at the same p
    (slope ratio): the architectures figure's slopes, compared."""
    ps, means = [row["p"] for row in rows], [row["mean"] for row in rows]
    slope, intercept, r2 = _fit(ps, means, 3, " ")
    text = f"({e}, {h}): slope {slope:.2f}, intercept {intercept:+.1f}, {r2}"
    published = [(row["p"], row["published"]) for row in rows if row["published"]]
    if len(published) >= 2:
        pub_slope, pub_intercept, _ = linear_fit(*zip(*published))
        text += (f"; published single runs (p = {', '.join(str(p) for p, _ in published)}): slope {pub_slope:.2f}, "
                 f"intercept {pub_intercept:+.1f}; slope ours / published {slope / pub_slope - 1:+.1%}")
    return text


def _mean_sd(row) -> str:
    if row is None:
        return "–"
    return _fmt(row["mean"]) + (f" ± {_fmt(row['sd'])} ({row['seeds']})" if row["seeds"] > 1 else "")


def _quadratic_fit_line(rows: dict, label: str) -> list[str]:
    trusted = [(p, row["mean"]) for p, row in rows.items() if targets.in_claim_range(p)]
    if len(trusted) < 2:
        return []
    ps, values = zip(*trusted)
    a, c, r2 = _fit(np.array(ps) ** 2, values)
    return ["", f"{label}: fit over p ∈ {_CLAIM_PS}: λ̂ ≈ {a:.3f}·p² {c:+.1f} ({r2}); the study's claim is a ≈ "
            f"{targets.MEMORISATION_CLAIM['a']:g}."]


def _quadratic_fit_runs(records, label: str) -> list[str]:
    """λ̂ ≈ a·p² + c over every run at p in the claim's range (each seed its own point), with its R²: beside the
    fit of the means, whose R² hides the seed spread."""
    points = [(r["training"]["p"], _llc(r)) for r in records if targets.in_claim_range(r["training"]["p"])]
    if len({p for p, _ in points}) < 2:
        return []
    ps, values = zip(*points)
    a, c, r2 = _fit(np.array(ps) ** 2, values)
    return ["", f"{label}: fit over p ∈ {_CLAIM_PS}: λ̂ ≈ {a:.3f}·p² {c:+.1f} ({r2}, {len(points)} runs)."]


def _chain_length_job(record) -> bool:
    """A job of the chain-length study (one long chain and its prefixes): shown in its own table only."""
    return bool(record.get("chain_length_study") or record.get("prefix_results"))


def report_memorization(records, out: Path) -> list[str]:
    main = [r for r in records if not _chain_length_job(r)]
    lines = ["### memorisation against generalisation", ""]
    fits = []
    for index, (label, group) in enumerate(_variant_groups(main, memorization_label)):
        group_lines, fit = _memorization_group(group, out, _png("memorization", index, group, memorization_label))
        lines += _heading(label, group) + group_lines
        fits.append((label, fit))
    lines += _claim_under_each_setting(fits)
    lines += report_chain_length([r for r in records if _chain_length_job(r)])
    return lines


def _network_of(records, task: str, default: tuple[int, int]) -> tuple[int, int]:
    """(e, h) of the ``task`` records of a group (their first), or ``default`` when the group has none."""
    for r in records:
        if r["training"].get("task") == task and "embed" in r["training"]:
            return r["training"]["embed"], r["training"].get("hidden", 32)
    return default


def _memorization_group(records, out: Path, png: str) -> tuple[list[str], dict]:
    tasks = _by(records, lambda r: r["training"]["task"])
    network = _network_of(records, "random", targets.MEMORISATION_CLAIM["network"])
    lines = [f"| p | λ̂ random operation (± sd, seeds) | published (e{network[0]} h{network[1]}) | "
             f"λ̂ modular addition | {_CLAIM} | ours / published | memorised (train acc {_MEMORISED}) | "
             f"addition generalised (test acc ≥ {_GENERALISED}; test accuracies) |",
             "|---|---|---|---|---|---|---|---|"]
    memo = {row["p"]: row for row in _summary_rows(tasks.get("random", []))}
    gen = {row["p"]: row for row in _summary_rows(tasks.get("add", []))}
    memo_by_p = _by(tasks.get("random", []), lambda r: r["training"]["p"])
    gen_by_p = _by(tasks.get("add", []), lambda r: r["training"]["p"])
    for p in sorted(set(memo) | set(gen)):
        m, g = memo.get(p), gen.get(p)
        ratio = m["mean"] / m["published"] if m and m["published"] else None
        memorised = (f"{sum(targets.memorised(r) for r in memo_by_p[p])} of {len(memo_by_p[p])}" if p in memo_by_p else "–")
        lines.append(f"| {p} | {_mean_sd(m)} | {_fmt(m['published'], 0) if m and m['published'] else '–'} | "
                     f"{_mean_sd(g)} | {targets.MEMORISATION_CLAIM['a'] * p * p:.0f} | {_fmt(ratio, 3)} | {memorised} | "
                     f"{_generalised_cell(gen_by_p.get(p))} |")
    lines += _quadratic_fit_line(memo, "Means over seeds (one point per p)")
    lines += _quadratic_fit_runs(tasks.get("random", []), "Every run (one point per seed)")
    fit = dict(memo=memo, gen=gen, a=_quadratic_fit(memo), random=tasks.get("random", []))
    # λ̂ of a network that has not memorised its train set is not the claim's quantity: shown beside, never instead
    kept = [r for r in tasks.get("random", []) if targets.memorised(r)]
    if 0 < len(kept) < len(tasks.get("random", [])):
        memorised = {row["p"]: row for row in _summary_rows(kept)}
        per_p = ", ".join(f"p = {p}: {_fmt(row['mean'])} ({row['seeds']})" for p, row in memorised.items())
        lines += ["", f"Runs that memorised (final train accuracy {_MEMORISED}), {len(kept)} of {len(tasks['random'])}: {per_p}."]
        lines += _quadratic_fit_line(memorised, "Runs that memorised, means over seeds")
        lines += _quadratic_fit_runs(kept, "Runs that memorised, one point per run")
    lines += _memorization_targets(memo, fit["a"], network)
    lines += locality_table(records, lambda r: (r["training"]["task"], r["training"]["p"]), "task, p",
                            lambda k: f"{'random operation' if k[0] == 'random' else 'modular addition'}, {k[1]}")
    _memorization_plot(memo, gen, records, out / png)
    return lines + ["", f"![memorisation]({png})", ""], fit


def _memorization_plot(memo: dict, gen: dict, records, path: Path) -> None:
    """λ̂ of both tasks against p (every seed faint, mean ± sd), the published values and the a·p² curve."""
    random_net = _network_of(records, "random", targets.MEMORISATION_CLAIM["network"])
    add_net = _network_of(records, "add", (8, 32))
    fig = _figure(figsize=(6, 4.2))
    ax = fig.subplots()
    for rows, style, colour, label in ((memo, "o-", "C0", f"random operation (e={random_net[0]}, h={random_net[1]})"),
                                       (gen, "s-", "C1", f"modular addition (e={add_net[0]}, h={add_net[1]}; "
                                                         "see the table for which generalised)")):
        if not rows:
            continue
        for p, row in rows.items():  # every seed, faint
            ax.scatter([p] * len(row["values"]), row["values"], color=colour, alpha=0.35, s=12)
        ax.errorbar(list(rows), [r["mean"] for r in rows.values()],
                    yerr=[0 if math.isnan(r["sd"]) else r["sd"] for r in rows.values()], fmt=style, color=colour,
                    capsize=3, label=label + (": mean ± sd over seeds" if any(r["seeds"] > 1 for r in rows.values()) else ""))
    published = [(p, r["published"]) for p, r in memo.items() if r["published"]]
    if published:
        ax.plot(*zip(*published), "x", color="C3", ms=9, label=f"published (e{random_net[0]} h{random_net[1]})")
    grid = np.linspace(0, max(list(memo) + list(gen) + [1]) * 1.05, 50)
    ax.plot(grid, targets.MEMORISATION_CLAIM["a"] * grid**2, "--", color="0.5", label=f"{_CLAIM} (train-set size)")
    ax.set_xlabel("p")
    ax.set_ylabel("λ̂")
    ax.set_title(memorization_label(records[0]), fontsize=9)
    ax.legend(fontsize=8)
    _save(fig, path)


def _generalised_cell(group) -> str:
    """How many of the modular-addition runs at one p generalised, and each one's final test accuracy: the
    column is not "generalising networks" unless they did (at p = 5 none do)."""
    if not group:
        return "–"
    accuracies = ", ".join(_fmt(r.get("final_metrics", {}).get("test_acc"), 2)
                           for r in sorted(group, key=lambda r: r["training"].get("seed", 0)))
    return f"{sum(map(targets.generalised, group))} of {len(group)} ({accuracies})"


def _quadratic_fit(rows: dict) -> tuple[float, float, float]:
    """a, c and R² of λ̂ ≈ a·p² + c over the means at p in the claim's range (NaN with fewer than two p)."""
    trusted = [(p, row["mean"]) for p, row in rows.items() if targets.in_claim_range(p)]
    if len(trusted) < 2:
        return math.nan, math.nan, math.nan
    ps, values = zip(*trusted)
    return linear_fit(np.array(ps) ** 2, values)


def _memorization_targets(memo: dict, fit, network: tuple[int, int]) -> list[str]:
    """The memorisation targets (``targets.memorization_verdict``), each with its numbers: met or not."""
    verdict = targets.memorization_verdict(memo, fit[0], network)
    if verdict is None:
        return []
    goals = targets.MEMORIZATION_TARGETS
    (low, high), primes = goals["a"], ", ".join(map(str, goals["primes"]))
    each = ", ".join(f"p = {p}: {d:+.1%}" for p, d in verdict["differences"])
    a_text = (f"fit a ∈ [{low}, {high}]: {_met(verdict['a_met'])} (a = {fit[0]:.3f})" if verdict["a_met"] is not None
              else f"fit a = {fit[0]:.3f} (the {_CLAIM} claim is about e{targets.MEMORISATION_CLAIM['network'][0]}/"
                   f"h{targets.MEMORISATION_CLAIM['network'][1]} networks: not judged here)")
    return ["", f"Targets: each of p = {primes} within {goals['within']:.0%} of the published value: "
            f"{_met(verdict['means_met'])} ({each}); {a_text}."]


def _claim_under_each_setting(fits) -> list[str]:
    """The memorisation claim (a·p², ``targets.MEMORISATION_CLAIM``) under every settings group, one row each,
    side by side: the fit, the ratios to the published values, and what says whether λ̂ measured the geometry
    (``_claim_evidence``: λ̂/n, the memorising chains' locality, memorising over addition λ̂)."""
    rows = [(label, fit) for label, fit in fits if not math.isnan(fit["a"][0])]
    if not rows:
        return []
    primes = targets.MEMORIZATION_TARGETS["primes"]
    lines = [f"### robustness: the {_CLAIM} claim under each setting", "",
             f"Over the random operation's runs at p ∈ {_CLAIM_PS}: λ̂/n (n = 0.8 p², the train-set size), the locality "
             "of their chains, and λ̂ of the memorising network over that of the modular-addition network beside it "
             "(ratio of the means at each p; min–max over p).", "",
             f"| settings | a (λ̂ ≈ a·p² + c, p ∈ {_CLAIM_PS}) | c | R² | " + " | ".join(f"ours / published, p = {p}" for p in primes)
             + " | λ̂/n (min–max) | locality (min–max) | nonlocal | memorising / addition (min–max) |",
             "|---|---|---|---|" + "---|" * len(primes) + "---|---|---|---|"]
    for label, fit in rows:
        a, c, r2 = fit["a"]
        ratios = [fit["memo"][p]["mean"] / fit["memo"][p]["published"] if p in fit["memo"] and fit["memo"][p]["published"]
                  else None for p in primes]
        lines.append(f"| {label} | {a:.3f} | {c:+.1f} | {_fmt(r2, 4)} | " + " | ".join(_fmt(x, 3) for x in ratios)
                     + " | " + " | ".join(_claim_evidence(fit)) + " |")
    return lines + [""]


def _span(values, digits: int = 2) -> str:
    """"mean (min–max)" of the finite values, or "–"."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    return f"{_fmt(_mean(values), digits)} ({_fmt(min(values), digits)}–{_fmt(max(values), digits)})" if values else "–"


def _claim_evidence(fit) -> list[str]:
    """For the random operation's runs at p in the claim's range: λ̂/n, their chains' locality and how many are
    nonlocal, and the ratio of the memorising to the addition network's mean λ̂ per p."""
    from ..tasks import train_size

    runs = [r for r in fit["random"] if targets.in_claim_range(r["training"]["p"])]
    per_n = [_llc(r) / train_size(r["training"]["p"], r["training"].get("train_frac", 0.8)) for r in runs]
    localities = [record_locality(r)[0] for r in runs]
    flags = [f for f in map(is_nonlocal, runs) if f is not None]
    over = [fit["memo"][p]["mean"] / fit["gen"][p]["mean"] for p in fit["memo"]
            if targets.in_claim_range(p) and p in fit["gen"] and fit["gen"][p]["mean"]]
    return [_span(per_n), _span(localities), f"{sum(flags)} of {len(flags)}" if flags else NOT_RECORDED, _span(over)]


def report_chain_length(records) -> list[str]:
    """Memorisation λ̂ against chain length: each long chain's prefixes and its whole, per settings group, with
    the stationarity diagnostics of each cell (drift of the mean loss from the first to the last tenth of the
    records, and split-R̂ across chains)."""
    from .jobs import chain_locality

    if not records:
        return []
    lines = ["### robustness: memorisation λ̂ against chain length", "",
             "Drift: mean loss of the last tenth of the records minus that of the first tenth (nats; mean over seeds, "
             "and as a fraction of λ̂/nβ, the loss excess λ̂ measures); split-R̂: the largest over seeds.", "",
             "| settings | p | steps | λ̂ mean ± sd (seeds) | drift (nats) | drift / (λ̂/nβ) | split-R̂ | locality (min–max) |",
             "|---|---|---|---|---|---|---|---|"]
    for label, group in _variant_groups(records):
        for p, at_p in _by(group, lambda r: r["training"]["p"]).items():
            cells = defaultdict(list)
            for record in at_p:
                for result in record.get("prefix_results", []) + [record["result"]]:
                    cells[result["steps"]].append(result)
            for steps, results in sorted(cells.items()):
                values = [math.nan if r["llc_mean"] is None else r["llc_mean"] for r in results]
                drifts = [r["loss_trace_summary"]["last_tenth_mean_loss"] - r["loss_trace_summary"]["first_tenth_mean_loss"]
                          for r in results if r["loss_trace_summary"].get("mean_loss") is not None]
                excess = [r["llc_mean"] / r["nbeta"] for r in results if r["llc_mean"] and isinstance(r["nbeta"], (int, float))]
                relative = np.mean(drifts) / np.mean(excess) if drifts and excess else None
                r_hats = [r["r_hat"] for r in results if r.get("r_hat") is not None]
                row = dict(mean=_mean(values), sd=_sd(values, 1), seeds=len(values))
                localities = [v for v in (chain_locality(r, p)["locality"] for r in results) if v is not None]
                locality = (f"{_fmt(_mean(localities), 2)} ({_fmt(min(localities), 2)}–{_fmt(max(localities), 2)})"
                            if localities else NOT_RECORDED)
                lines.append(f"| {label} | {p} | {steps} | {_mean_sd(row)} | {_fmt(np.mean(drifts) if drifts else None, 3)} | "
                             f"{_fmt(relative, 3)} | {_fmt(max(r_hats) if r_hats else None, 3)} | {locality} |")
    return lines + [""]


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
        ax.set_title(f"p={record['training']['p']}, seed {record['training']['seed']}; {settings_label(record)}", fontsize=9)
        peak = int(np.nanargmax(np.array(llc, dtype=float)))
        lines.append(f"seed {record['training']['seed']} ({settings_label(record)}): λ̂ from {_fmt(llc[0])} at checkpoint 0 to a peak of "
                     f"{_fmt(llc[peak])} at checkpoint {peak}, {_fmt(llc[-1])} at the last; test loss "
                     f"{record['metrics'][0]['test_loss']:.2f} → {record['metrics'][-1]['test_loss']:.3f}")
        lines.append(_dynamics_locality(record, peak))
    fig.tight_layout()
    _save(fig, out / "dynamics.png")
    return lines + ["", "![dynamics](dynamics.png)", ""]


def _dynamics_locality(record, peak: int) -> str:
    """The locality of each checkpoint's chains (recorded, or computed from its mean sampled loss), at the
    first, the peak and the last checkpoint, and how many checkpoints are nonlocal."""
    from ..calibration import LOCALITY_LIMIT
    from .jobs import chain_locality

    p = record["training"]["p"]
    values = [r.get("locality") if r.get("locality") is not None else chain_locality(r, p)["locality"]
              for r in record["results"]]
    known = [v for v in values if v is not None]
    if not known:
        return f"  locality of the chains: {NOT_RECORDED}"
    at = ", ".join(f"{name} {'n/a (L_n(w*) ≥ log p)' if values[i] is None else _fmt(values[i], 2)}" for name, i in (("checkpoint 0", 0), (f"peak (checkpoint {peak})", peak),
                                                                 ("last", len(values) - 1)))
    return (f"  locality of the chains: {at}; {sum(v > LOCALITY_LIMIT for v in known)} of {len(known)} checkpoints "
            f"nonlocal (> {LOCALITY_LIMIT:g})")


def recommended(cell: dict, smaller: dict | None) -> bool:
    """On the plateau by ``fastllc.calibration``'s rule: the cell and the next smaller ε at the same γ and nβ
    both healthy, stationary and mixed, their λ̂ in agreement (``calibration.agree``). Reads the older
    records too (no ``drift``: the tenths' rule they were made with). The smallest ε of a row is never marked."""
    from ..calibration import agree

    return agree(cell, smaller)


def _calibrated_network(record) -> str:
    """", random operation, e50/h200" for a grid on another network than the study's e8/h32 addition one."""
    training = record["training"]
    task, e, h = training.get("task", "add"), training.get("embed", 8), training.get("hidden", 32)
    if (task, e, h) == ("add", 8, 32):
        return ""
    return f", {'random operation' if task == 'random' else 'modular addition'}, e{e}/h{h}"


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
        lines += [f"p = {record['training']['p']}, seed {record['training']['seed']}{_calibrated_network(record)}", "",
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


# numbers each kind of record must hold where the reports read them: (container, its keys); a value may be
# null (no healthy chain: no λ̂), never a string or absent
REPORT_NUMBERS = {"final": (("result", ("llc_mean", "llc_se")),),
                  "dynamics": (("results[]", ("llc_mean",)), ("metrics[]", ("train_loss", "test_loss"))),
                  "calibrate": (("cells[]", ("epsilon", "nbeta", "gamma", "llc_mean", "llc_se", "healthy_fraction")),)}


def _numbers_problem(record: dict) -> str | None:
    """The first number a report would read that is missing or not a number (e.g. llc_mean "abc"), or None:
    such a record is skipped with a warning naming its file, instead of failing the whole report."""
    for container, keys in REPORT_NUMBERS.get(record["kind"], ()):
        name = container.rstrip("[]")
        items = record.get(name) if container.endswith("[]") else [record.get(name)]
        if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
            return f"{name} is not {'a list of objects' if container.endswith('[]') else 'an object'}"
        for item in items:
            for key in keys:
                value = item.get(key, "missing")
                if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                    return f"no {name}.{key}" if value == "missing" else f"{name}.{key} is {value!r}, not a number"
    metrics = record.get("final_metrics", {})
    if not isinstance(metrics, dict) or any(not isinstance(metrics.get(k, 0), (int, float)) for k in ("train_acc", "test_acc")):
        return "final_metrics has a non-numeric accuracy"
    return None


def _report_problem(record: dict) -> str | None:
    """Why a report cannot use ``record`` (an unknown sweep, a missing field, a non-number), or None."""
    if record["sweep"] not in REPORTS:
        return f"unknown sweep {record['sweep']!r}"
    missing = [f for f in REPORT_FIELDS[record["sweep"]] if f.split(".")[1] not in record["training"]]
    return f"no {missing[0]!r} field" if missing else _numbers_problem(record)


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
