"""fastllc.calibrate on fresh random problems with a known λ: errors, interval coverage, cost.

    python examples/calibration_study.py --seed 1 --count 20                     # 20 deep linear networks
    python examples/calibration_study.py --seed 2 --families dln,rrr,regular,monomial --sampler rmsprop_sgld
    python examples/calibration_study.py --seed 1 --count 20 --save docs/calibration/seed1.json

Each problem is drawn by ``fastllc.theory.problems.draw_problems`` from the seed (printed); nothing is tuned per
problem. For each: ``calibrate`` with its defaults (κ measured at w*, step scales s = ε·nβ·κ ∈ {0.1, 0.05,
0.025}, nβ = n/log n) and the given chains, steps, γ and batch size, all cells in one batched run. Three ways
of reading the grid are scored against the exact λ: the ε → 0 extrapolation (what calibrate reports), the
recommended cell alone (smallest stationary ε) and the largest-ε cell alone.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch

from fastllc import calibrate
from fastllc.calibration import run_cells
from fastllc.theory.problems import draw_problems


def quantile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(math.ceil(q * len(ordered))) - 1)]


def study(args) -> list[dict]:
    rows = []
    for problem in draw_problems(args.seed, args.count, args.families.split(","), n=args.n):
        start = time.perf_counter()
        result = calibrate(problem.model, problem.data, problem.loss_fn, chains=args.chains, steps=args.steps,
                           gammas=[float(g) for g in args.gammas.split(",")], batch_size=args.batch_size,
                           backend="generic", seed=args.seed, sampler=args.sampler,
                           **({"step_scales": [float(v) for v in args.scales.split(",")]} if args.scales else {}))
        seconds = time.perf_counter() - start
        band, cell = result.interval, result.recommended_cell
        largest = max((c for c in result.cells if c.gamma == (cell or result.cells[0]).gamma), key=lambda c: c.epsilon)
        row = dict(problem=problem.name, family=problem.family, params=problem.parameters, llc=problem.llc,
                   kappa=result.kappa, seconds=seconds,
                   recommended=None if cell is None else cell.llc_mean, se=None if cell is None else cell.llc_se,
                   low=None if band is None else band.low, high=None if band is None else band.high,
                   largest=largest.llc_mean if not largest.flags else None,
                   cells=[dict(s=c.step_scale, epsilon=c.epsilon, gamma=c.gamma, llc=c.llc_mean, se=c.llc_se, flags=c.flags, drift=c.drift, drift_relative=c.drift_relative, r_hat=c.r_hat)
                          for c in result.cells])
        row["covered"] = band is not None and band.low <= problem.llc <= band.high
        for label, epsilon, gamma in args.hand:  # fixed settings, read the same way (one cell, same chains)
            n = len(problem.data[1])
            hand = run_cells(problem.model, problem.data, problem.loss_fn, [(epsilon, n / math.log(n), gamma)],
                             chains=args.chains, steps=args.steps, burn_in=args.steps // 4, batch_size=args.batch_size,
                             backend="generic", seed=args.seed, default_nbeta=n / math.log(n), sampler=args.sampler)
            row[label] = hand.cells[0].llc_mean if not hand.cells[0].flags else None
        rows.append(row)
        cells = " ".join(f"{c['llc']:.3g}{'*' if c['flags'] else ''}" for c in row["cells"])
        print(f"{problem.name:<40} λ={problem.llc:7.3g} λ̂: {_text(row['recommended'])} "
              f"[{_text(row['low'])}, {_text(row['high'])}] {'✓' if row['covered'] else '✗'}  cells: {cells}  "
              f"({seconds:.0f} s)", flush=True)
    return rows


def _text(value):
    return "–" if value is None else f"{value:.3g}"


def summary(rows: list[dict]) -> list[str]:
    lines = []
    hands = [(label, label) for label in rows[0] if label.startswith("hand")] if rows else []
    for key, label in (("recommended", "recommended cell"), ("largest", "largest-ε cell alone"), *hands):
        errors = [abs(r[key] - r["llc"]) / r["llc"] for r in rows if r[key] is not None]
        signed = [r[key] - r["llc"] for r in rows if r[key] is not None]
        if errors:
            lines.append(f"{label:<24} median |err| {statistics.median(errors):6.1%}  90th pct "
                         f"{quantile(errors, 0.9):6.1%}  max {max(errors):6.1%}  over {sum(s > 0 for s in signed)} "
                         f"of {len(errors)}")
    covered = sum(r["covered"] for r in rows)
    lines.append(f"90% interval covers λ for {covered} of {len(rows)} ({covered / len(rows):.0%})")
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
    parser.add_argument("--scales", default=None, help="step scales s = ε·nβ·κ (default: calibrate's)")
    parser.add_argument("--hand", action="append", default=[], metavar="EPSILON,GAMMA",
                        help="also estimate at these fixed settings (repeatable), reported as 'hand ε γ'")
    parser.add_argument("--save", default=None, help="write the rows and the settings as JSON")
    args = parser.parse_args(argv)
    args.hand = [(f"hand ε={e} γ={g}", float(e), float(g)) for e, g in (h.split(",") for h in args.hand)]
    torch.set_num_threads(1)
    print(f"seed {args.seed}: {args.count} problems ({args.families}), n = {args.n}, {args.chains} chains × "
          f"{args.steps} steps per cell, γ ∈ {{{args.gammas}}}, batch {args.batch_size}, {args.sampler}", flush=True)
    rows = study(args)
    lines = summary(rows)
    print("\n".join(lines))
    if args.save:
        with open(args.save, "w") as file:
            json.dump(dict(settings=vars(args), rows=rows, summary=lines), file, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
