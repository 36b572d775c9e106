"""fastllc beside devinterp 2.0.1 itself on the tiny GPT-2 (``lm_workload``), 200 draws, the same ``llc()`` arguments,
at 4 and 16 chains, in one run: ``devinterp2_rate.py`` in devinterp 2.0.1's environment (build/venv-devinterp2,
which ``.ci/run`` builds: devinterp 1.3.2, in this environment, cannot share one with it), the two calls
alternating in one process. Reports chain-steps per second of each call's wall time, the ratio of the medians,
fastllc's share of the sgemm ceiling (torch's threads) measured in the same run, and λ̂ of both with their standard errors
(they must agree within 3 combined standard errors: the same settings, different noise streams).

    python -m pytest bench/test_bench_devinterp2.py --benchmark-only -s
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

from conftest import record
from lm_workload import SGLD, WORKLOAD

pytestmark = pytest.mark.benchmark(min_rounds=1)

ROOT = Path(__file__).resolve().parent.parent
PYTHON = ROOT / "build" / "venv-devinterp2" / "bin" / "python"
CHAINS, ROUNDS = (4, 16), 3


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    if not PYTHON.is_file():
        pytest.skip(f"devinterp 2.0.1's environment {PYTHON.parent.parent} is missing: .ci/run builds it")
    out = tmp_path_factory.mktemp("devinterp2") / "rates.json"
    command = [str(PYTHON), str(ROOT / "bench" / "devinterp2_rate.py"), "--chains", *map(str, CHAINS),
               "--rounds", str(ROUNDS), "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("chains", CHAINS)
def test_fastllc_beside_devinterp2(benchmark, measured, chains):
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the timing ran in devinterp 2.0.1's environment
    for way in ("devinterp 2.0.1", "fastllc"):
        rows = measured["runs"][f"{way} C{chains}"]
        record(benchmark, way, WORKLOAD, chains, SGLD["steps"], [row["wall_s"] for row in rows])
        benchmark.extra_info[f"{way} rates"] = [round(row["rate"], 1) for row in rows]
    theirs, ours = (measured["runs"][f"{way} C{chains}"][-1] for way in ("devinterp 2.0.1", "fastllc"))
    gap = abs(theirs["llc"] - ours["llc"]) / math.hypot(theirs["se"], ours["se"])
    benchmark.extra_info["llc gap in combined SE"] = round(gap, 2)
    assert gap <= 3, f"λ̂ {theirs['llc']:.2f} ± {theirs['se']:.2f} against {ours['llc']:.2f} ± {ours['se']:.2f}"


def test_summary(benchmark, measured):
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    m = measured
    lines = [f"\ntiny GPT-2 ({m['workload']}), {SGLD['steps']} draws, on {m['cpu']} ({m['threads']} threads); "
             f"{m['threads']}-thread sgemm ceiling {m['ceiling_gflops']:.0f} GFLOP/s; load {m['load_before']:.1f} → {m['load_after']:.1f}",
             f"{'chains':>6} {'devinterp 2.0.1':>22} {'fastllc':>22} {'ratio':>6} {'fastllc % ceiling':>18} "
             f"{'λ̂ devinterp':>16} {'λ̂ fastllc':>16}"]
    for chains in CHAINS:
        theirs, ours = (m["runs"][f"{way} C{chains}"] for way in ("devinterp 2.0.1", "fastllc"))
        rate = {way: m["medians"][f"{way} C{chains}"] for way in ("devinterp 2.0.1", "fastllc")}
        share = rate["fastllc"] * m["flops_per_chain_step"] / (m["ceiling_gflops"] * 1e9)
        each = {way: ", ".join(f"{r['rate']:.0f}" for r in rows) for way, rows in
                (("devinterp 2.0.1", theirs), ("fastllc", ours))}
        lines.append(f"{chains:>6} {rate['devinterp 2.0.1']:7.1f} ({each['devinterp 2.0.1']:>12}) "
                     f"{rate['fastllc']:7.1f} ({each['fastllc']:>12}) {rate['fastllc'] / rate['devinterp 2.0.1']:5.2f}x "
                     f"{share:17.0%} {theirs[-1]['llc']:8.2f} ± {theirs[-1]['se']:5.2f} "
                     f"{ours[-1]['llc']:8.2f} ± {ours[-1]['se']:5.2f}")
    print("\n".join(lines))
