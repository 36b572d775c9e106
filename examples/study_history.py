"""The study's p-sweep runs as its git history records them: which runs were replaced, and the spread before.

    git clone https://github.com/nrimsky/devinterp && python examples/study_history.py --repo devinterp \\
        --json docs/results/seed-spread/study_history.json

Each run of the study's p-sweep is a file ``modular_addition/experiment_params/psweep_repeats/{p}_{run}.json``
holding its settings, λ̂ and train/test loss. They were first filled in by commit 48745c1 (2023-10-13, "Experiment
code") and rewritten the next day by 9dbd175 ("Fix bugs"); the published figure is the later state (unchanged
up to c818e82, the parent of the commit that deleted them). This script reads both states, says which runs
changed and how (training length, test loss, λ̂) and gives each p's mean and population sd (the published
basis) before and after. Nothing is trained.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import numpy as np

FIRST, FINAL = "48745c1", "c818e82"  # λ̂ first recorded; the state the figure was made from (after 9dbd175)
FOLDER = "modular_addition/experiment_params/psweep_repeats"
PRIMES, RUNS = (23, 29, 37, 41, 47, 53), range(5)


def run_file(repo: Path, commit: str, p: int, run: int) -> dict:
    text = subprocess.run(["git", "-C", str(repo), "show", f"{commit}:{FOLDER}/{p}_{run}.json"], check=True,
                          capture_output=True, text=True).stdout
    record = json.loads(text)
    return {key: record.get(key) for key in ("n_batches", "lambda_hat", "test_loss", "train_loss")}


def history(repo: Path) -> dict:
    """{p: {run: {"first": ..., "final": ...}}} and per p the mean and population sd of λ̂ in each state."""
    runs = {p: {run: {state: run_file(repo, commit, p, run) for state, commit in (("first", FIRST), ("final", FINAL))}
                for run in RUNS} for p in PRIMES}
    summary = {}
    for p, by_run in runs.items():
        summary[p] = {state: dict(mean=float(np.mean([r[state]["lambda_hat"] for r in by_run.values()])),
                                  sd_ddof0=float(np.std([r[state]["lambda_hat"] for r in by_run.values()])))
                      for state in ("first", "final")}
        summary[p]["replaced_runs"] = [run for run, r in by_run.items() if r["first"] != r["final"]]
    return dict(source="github.com/nrimsky/devinterp", first_commit=FIRST, final_commit=FINAL, folder=FOLDER,
                runs={str(p): {str(k): v for k, v in by_run.items()} for p, by_run in runs.items()},
                summary={str(p): v for p, v in summary.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, required=True, help="a clone of nrimsky/devinterp")
    parser.add_argument("--json", type=Path, default=None, help="write the history here")
    args = parser.parse_args()
    found = history(args.repo)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(found, indent=1) + "\n")
    print("| p | runs replaced | λ̂ first (48745c1) | mean ± sd | λ̂ published (c818e82) | mean ± sd | test loss first → published |")
    print("|---|---|---|---|---|---|---|")
    for p, row in found["summary"].items():
        runs = found["runs"][p]
        each = {state: ", ".join(f"{runs[str(k)][state]['lambda_hat']:.1f}" for k in RUNS) for state in ("first", "final")}
        losses = "; ".join(f"run {k}: {runs[str(k)]['first']['test_loss']:.3f} → {runs[str(k)]['final']['test_loss']:.3f}"
                           for k in row["replaced_runs"])
        batches = sorted({(runs[str(k)]["first"]["n_batches"], runs[str(k)]["final"]["n_batches"]) for k in RUNS})
        replaced = f"{row['replaced_runs']} ({'; '.join(f'{a} → {b} batches' for a, b in batches)})"
        print(f"| {p} | {replaced} | {each['first']} | {row['first']['mean']:.1f} ± {row['first']['sd_ddof0']:.1f} | "
              f"{each['final']} | {row['final']['mean']:.1f} ± {row['final']['sd_ddof0']:.1f} | {losses} |")


if __name__ == "__main__":
    main()
