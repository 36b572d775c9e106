"""λ̂ against the exact learning coefficient of deep linear networks, as a table.

    python examples/dln_benchmark.py            # the 12-network suite with the fixed hand settings (~2 min)
    python examples/dln_benchmark.py 20-20-20 5  # one network: widths joined by '-', then the true rank

The exact λ is Aoyagi's (Neural Networks 2024, Theorem 1; ``fastllc.theory.dln.dln_learning_coefficient``);
the teacher has every layer of the given rank and the data make it the exact minimum of the training loss.
"""

import sys

import torch

from fastllc import FastLLCError
from fastllc.theory.dln import BENCHMARK_CONFIGS, BENCHMARK_N, HAND_SETTINGS, DLNConfig, benchmark_table, format_table

torch.set_num_threads(1)  # small matmuls: one thread per chain group is faster than an intra-op pool
try:
    if len(sys.argv) == 3:
        try:
            configs = [DLNConfig(tuple(int(w) for w in sys.argv[1].split("-")), int(sys.argv[2]))]
        except ValueError:
            raise FastLLCError(f"expected WIDTHS RANK like '20-20-20 5', got {' '.join(sys.argv[1:])!r}") from None
    elif len(sys.argv) == 1:
        configs = BENCHMARK_CONFIGS
    else:
        raise FastLLCError("give no arguments (the whole suite) or WIDTHS RANK, like '20-20-20 5'")
    rows = benchmark_table(configs, HAND_SETTINGS, n=BENCHMARK_N,
                           progress=lambda row: print(f"  {row['config']}: {row['seconds']:.0f} s", file=sys.stderr))
except FastLLCError as error:
    sys.exit(f"Error: {error}")
print("\n".join(format_table(rows)))
