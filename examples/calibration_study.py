"""fastllc.calibrate on fresh random problems with a known λ: errors, interval coverage, ways of reading a grid.

    python examples/calibration_study.py --seed 1 --count 20 --save dln-seed1.json     # 20 deep linear networks
    python examples/calibration_study.py --seed 1 --scales 0.2,0.1,0.05,0.025 --hand 5e-6,10 --save s1.json
    python examples/calibration_study.py --summarise s1.json                          # the comparison table again
    python examples/calibration_study.py --seed 2 --families dln,rrr,regular,monomial --sampler rmsprop_sgld

Each problem is drawn by ``fastllc.theory.problems.draw_problems`` from the seed (printed); nothing is tuned per
problem. For each: ``calibrate`` (κ measured at w*, the given step scales s = ε·nβ·κ, default calibrate's
0.1 and 0.05, nβ = n/log n) with the given chains, steps, γ and batch size, all cells in one batched run, and
optionally estimates at fixed settings (``--hand ε,γ``) read the same way. The summary scores several ways of
reading the same cells against the exact λ: calibrate's rule and interval, each step scale alone, and a linear
extrapolation of λ̂(ε) to ε → 0; every cell is saved, so ``--summarise`` recomputes it from the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import numpy as np
import torch

from fastllc import FastLLCError, calibrate
from fastllc.calibration import SETTLED_STEP_SCALE, TARGET_STEP_SCALE, interval_of, recommend, run_cells, usable
from fastllc.theory.problems import draw_problems


def quantile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(math.ceil(q * len(ordered))) - 1)]


def study(args) -> list[dict]:
    rows = []
    scales = {} if args.scales is None else {"step_scales": [float(v) for v in args.scales.split(",")]}
    burn_in = {} if args.burn_in_scale is None else {"burn_in_scale": args.burn_in_scale or None}  # 0: none
    for problem in draw_problems(args.seed, args.count, args.families.split(","), n=args.n):
        n = len(problem.data[1])
        start = time.perf_counter()
        try:
            result = calibrate(problem.model, problem.data, problem.loss_fn, chains=args.chains, steps=args.steps,
                               gammas=[float(g) for g in args.gammas.split(",")], batch_size=args.batch_size,
                               backend="generic", seed=args.seed, sampler=args.sampler, **scales, **burn_in)
        except FastLLCError as err:  # counted as "no estimate"
            print(f"{problem.name:<40} λ={problem.llc:7.3g} no estimate: {err}", flush=True)
            rows.append(dict(problem=problem.name, family=problem.family, params=problem.parameters, llc=problem.llc,
                             kappa=None, seconds=time.perf_counter() - start, cells=[], error=str(err)))
            continue
        row = dict(problem=problem.name, family=problem.family, params=problem.parameters, llc=problem.llc,
                   kappa=result.kappa, coarse_burn_in=result.coarse_burn_in is not None,
                   seconds=time.perf_counter() - start, cells=[cell_record(c) for c in
                                                                                     result.cells])
        for label, epsilon, gamma in args.hand:  # fixed settings, read the same way (one cell, same chains)
            hand = run_cells(problem.model, problem.data, problem.loss_fn, [(epsilon, n / math.log(n), gamma)],
                             chains=args.chains, steps=args.steps, burn_in=args.steps // 4, batch_size=args.batch_size,
                             backend="generic", seed=args.seed, default_nbeta=n / math.log(n), sampler=args.sampler)
            row[label] = cell_record(hand.cells[0])
        rows.append(row)
        chosen = rule(row)
        cells = " ".join(f"{_text(c['llc'])}{'*' if c['flags'] else ''}" for c in row["cells"])
        print(f"{problem.name:<40} λ={problem.llc:7.3g} λ̂: {_text(chosen and chosen[0])} "
              f"[{_text(chosen and chosen[1])}, {_text(chosen and chosen[2])}]  cells: {cells}  "
              f"({row['seconds']:.0f} s)", flush=True)
    return rows


def cell_record(c) -> dict:
    return dict(s=c.step_scale, epsilon=c.epsilon, nbeta=c.nbeta, gamma=c.gamma, llc=_finite(c.llc_mean),
                se=_finite(c.llc_se), flags=c.flags, drift=_finite(c.drift), drift_relative=_finite(c.drift_relative),
                r_hat=_finite(c.r_hat), healthy_fraction=c.healthy_fraction)


def _finite(value):
    return value if value is not None and math.isfinite(value) else None


def _text(value):
    return "–" if value is None else f"{value:.3g}"


def as_cells(records) -> list[dict]:
    """Saved cells as the dicts ``calibration.recommend`` reads."""
    return [dict(epsilon=c["epsilon"], nbeta=c.get("nbeta", 1.0), gamma=c["gamma"], step_scale=c["s"],
                 llc_mean=math.nan if c["llc"] is None else c["llc"], llc_se=c["se"], drift=c["drift"],
                 drift_relative=c["drift_relative"], r_hat=c["r_hat"],
                 healthy_fraction=c.get("healthy_fraction", 0.0 if "diverged" in c["flags"] else 1.0))
            for c in records]


def rule(row, scales=None):
    """(λ̂, low, high) by calibrate's rule and interval on the row's cells (those at ``scales`` only), or None."""
    if not row["cells"]:
        return None
    cells = [c for c in as_cells(row["cells"]) if scales is None or any(math.isclose(c["step_scale"], s)
                                                                         for s in scales)]
    if not cells:
        return None
    target = SETTLED_STEP_SCALE if row.get("coarse_burn_in") else TARGET_STEP_SCALE  # as calibrate chose
    best, _, _ = recommend(cells, cells[0]["nbeta"], target)
    if best is None:
        return None
    band = interval_of(cells, best)
    return cells[best]["llc_mean"], band.low, band.high


def smallest_cell(row):
    """(λ̂, low, high) of the row's s = 0.05 cell with calibrate's interval for it (its neighbour: s = 0.1), or
    None: what the rule would give with its target at 0.05 (a reading for comparison; the rule's target is 0.1)."""
    cells = as_cells(row["cells"])
    index = next((i for i, c in enumerate(cells) if math.isclose(c["step_scale"], 0.05) and usable(c)), None)
    if index is None:
        return None
    band = interval_of(cells, index)
    return cells[index]["llc_mean"], band.low, band.high


def extrapolated(row):
    """λ̂ at ε → 0 by a weighted linear fit over the unflagged cells at s ≤ 0.1 (slope ≥ 0), or None."""
    cells = [c for c in row["cells"] if not c["flags"] and c["llc"] is not None and c["s"] <= 0.1 + 1e-9]
    if len(cells) < 2:
        return None
    x, y = np.array([c["s"] for c in cells]), np.array([c["llc"] for c in cells])
    w = 1 / np.maximum(np.array([c["se"] or 0 for c in cells]), 1e-12) ** 2
    slope = np.cov(x, y, aweights=w)[0, 1] / np.cov(x, aweights=w)
    mean_x, mean_y = np.average(x, weights=w), np.average(y, weights=w)
    return mean_y - max(slope, 0.0) * mean_x


def args_scales(rows) -> bool:
    """Whether every row ran the same explicit grid (else the default, possibly backed off)."""
    return len({tuple(sorted(round(c["s"], 6) for c in r["cells"])) for r in rows if r["cells"]}) == 1


def readings(rows) -> dict:
    """Each way of reading the cells: {label: [(estimate or None, low, high) per row]}."""
    scales = sorted({round(c["s"], 6) for row in rows for c in row["cells"]})
    ways = {"calibrate's rule and interval": [rule(r) for r in rows]}
    if args_scales(rows) and len(scales) > 2:
        ways["calibrate's rule on s = 0.1, 0.05 only (the default grid)"] = [rule(r, (0.1, 0.05)) for r in rows]
    for s in scales:
        ways[f"the cell at s = {s:g} alone"] = [next(((c["llc"], None, None) for c in r["cells"]
                                                     if math.isclose(c["s"], s) and c["llc"] is not None), None)
                                                for r in rows]
    if any(math.isclose(s, 0.05) for s in scales):
        ways["the s = 0.05 cell with calibrate's interval"] = [smallest_cell(r) for r in rows]
    ways["linear extrapolation to ε → 0 (s ≤ 0.1)"] = [(e, None, None) if e is not None else None
                                                       for e in map(extrapolated, rows)]
    for label in [k for k in rows[0] if k.startswith("hand")]:
        ways[label] = [(r[label]["llc"], None, None) if r[label]["llc"] is not None else None for r in rows]
    return ways


def summary(rows: list[dict]) -> list[str]:
    lines = [f"{'way of reading':<58} {'median':>7} {'90th':>7} {'max':>7} {'over':>6} {'none':>5} {'90% covers':>11}"]
    for label, values in readings(rows).items():
        pairs = [(v, r["llc"]) for v, r in zip(values, rows) if v is not None and v[0] is not None]
        errors = [abs(v[0] - llc) / llc for v, llc in pairs]
        if not errors:
            continue
        over = sum(v[0] > llc for v, llc in pairs)
        covered = [v[1] <= llc <= v[2] for v, llc in pairs if v[1] is not None]
        cover = f"{sum(covered)}/{len(covered)}" if covered else "–"
        lines.append(f"{label:<58} {statistics.median(errors):7.1%} {quantile(errors, 0.9):7.1%} {max(errors):7.1%} "
                     f"{over:>3}/{len(pairs):<2} {len(rows) - len(pairs):>5} {cover:>11}")
    return lines


def markdown(rows: list[dict]) -> list[str]:
    """Every network as a markdown table row: λ, the cells (⚑ flagged), calibrate's λ̂ and interval."""
    scales = sorted({round(c["s"], 6) for row in rows for c in row["cells"]})
    lines = [f"| network | d | λ | λ̂ at s = {' / '.join(f'{s:g}' for s in scales)} | calibrate's λ̂ | 90% interval | covers |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        cells = " / ".join(f"{_text(c['llc'])}{'⚑' if c['flags'] else ''}" for c in sorted(row["cells"], key=lambda c: c["s"]))
        chosen = rule(row)
        if chosen is None:
            lines.append(f"| {row['problem']} | {row['params']} | {row['llc']:g} | {cells} | – | – | – |")
            continue
        llc, low, high = chosen
        lines.append(f"| {row['problem']} | {row['params']} | {row['llc']:g} | {cells} | {llc:.3g} "
                     f"({(llc - row['llc']) / row['llc']:+.0%}) | [{low:.3g}, {high:.3g}] | "
                     f"{'✓' if low <= row['llc'] <= high else '✗'} |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--families", default="dln")
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--gammas", default="1")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--sampler", default="sgld")
    parser.add_argument("--scales", default=None, help="step scales s = ε·nβ·κ [default: calibrate's]")
    parser.add_argument("--burn-in-scale", type=float, default=None,
                        help="calibrate's burn_in_scale, the coarse burn-in's step scale (default: calibrate's; 0: none)")
    parser.add_argument("--hand", action="append", default=[], metavar="EPSILON,GAMMA",
                        help="also estimate at these fixed settings (repeatable)")
    parser.add_argument("--save", default=None, help="write the settings and every cell as JSON")
    parser.add_argument("--summarise", default=None, metavar="JSON", help="only print the summary of a saved study")
    parser.add_argument("--markdown", action="store_true", help="with --summarise: every network as a table row")
    args = parser.parse_args(argv)
    if args.summarise:
        saved = json.load(open(args.summarise))
        settings = saved["settings"]  # runs saved before the flag: a coarse burn-in iff burn_in_scale was set, not 0
        for row in saved["rows"]:
            row.setdefault("coarse_burn_in", "burn_in_scale" in settings and settings["burn_in_scale"] != 0)
        print(f"{args.summarise}: {saved['settings']}")
        print("\n".join(summary(saved["rows"])))
        if args.markdown:
            print("\n".join(markdown(saved["rows"])))
        return 0
    args.hand = [(f"hand ε = {e}, γ = {g}", float(e), float(g)) for e, g in (h.split(",") for h in args.hand)]
    torch.set_num_threads(1)
    print(f"seed {args.seed}: {args.count} problems ({args.families}), n = {args.n}, {args.chains} chains × "
          f"{args.steps} steps per cell, γ ∈ {{{args.gammas}}}, batch {args.batch_size}, {args.sampler}", flush=True)
    rows = study(args)
    if args.save:  # before the summary: nothing measured is lost to a summary's failure
        with open(args.save, "w") as file:
            json.dump(dict(settings={k: v for k, v in vars(args).items() if k != "summarise"}, rows=rows), file,
                      indent=1)
    print("\n".join(summary(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
