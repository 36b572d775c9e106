"""λ̂ against the exact learning coefficient of deep linear networks, as a table.

    python examples/dln_benchmark.py                  # the 12-network suite, fixed hand settings (~2 min)
    python examples/dln_benchmark.py 20-20-20 5        # one network: widths joined by '-', then the true rank
    python examples/dln_benchmark.py --calibrated      # hand settings and calibrate's recommendation side by side
    python examples/dln_benchmark.py --calibrated 20-20-20 5
    python examples/dln_benchmark.py --calibrated --save table.json   # also every row and calibration as JSON

The exact λ is Aoyagi's (Neural Networks 2024, Theorem 1; ``fastllc.theory.dln.dln_learning_coefficient``);
the teacher has every layer of the given rank and the data make it the exact minimum of the training loss.
With ``--calibrated`` each network first gets ``fastllc.calibrate`` with its default step scales ε·nβ·κ = 0.1
and 0.05 (``CalibratedSettings``), then a fresh estimate at the recommended cell (~2× the hand run's time).
"""

import json
import sys

import torch

from fastllc import FastLLCError
from fastllc.theory.dln import (BENCHMARK_CONFIGS, BENCHMARK_N, HAND_SETTINGS, CalibratedSettings, DLNConfig,
                                benchmark_table, format_comparison, format_table)

torch.set_num_threads(1)  # small matmuls: one thread per chain group is faster than an intra-op pool
arguments = sys.argv[1:]
calibrated = "--calibrated" in arguments
arguments = [a for a in arguments if a != "--calibrated"]
save = None
if "--save" in arguments[:-1]:
    at = arguments.index("--save")
    save, arguments = arguments[at + 1], arguments[:at] + arguments[at + 2:]


def report(row):
    print(f"  {row['config']}: {row['seconds']:.0f} s", file=sys.stderr, flush=True)


try:
    if len(arguments) == 2:
        try:
            configs = [DLNConfig(tuple(int(w) for w in arguments[0].split("-")), int(arguments[1]))]
        except ValueError:
            raise FastLLCError(f"expected WIDTHS RANK like '20-20-20 5', got {' '.join(arguments)!r}") from None
    elif not arguments:
        configs = BENCHMARK_CONFIGS
    else:
        raise FastLLCError("give no arguments (the whole suite) or WIDTHS RANK, like '20-20-20 5', and "
                           "optionally --calibrated")
    hand = benchmark_table(configs, HAND_SETTINGS, n=BENCHMARK_N, progress=report)
    if calibrated:
        settings = CalibratedSettings(BENCHMARK_N)
        rows = benchmark_table(configs, settings, n=BENCHMARK_N, progress=report)
        for name, result in settings.calibrations.items():
            print(f"{name}: {result.reason if result.recommended is not None else result.hint}", file=sys.stderr)
    if save:
        calibrations = {name: r.to_dict() for name, r in settings.calibrations.items()} if calibrated else {}
        with open(save, "w") as file:
            json.dump(dict(hand=hand, calibrated=rows if calibrated else None, calibrations=calibrations), file,
                      indent=1)
except FastLLCError as error:
    sys.exit(f"Error: {error}")
print("\n".join(format_comparison(hand, rows) if calibrated else format_table(hand)))
