"""λ̂ against the exact learning coefficient of deep linear networks (``fastllc.theory.dln``).

The first benchmark runs the whole suite (``BENCHMARK_CONFIGS``: 12 networks, 2–5 layers, widths 3–20, ranks 1 to
full) with the fixed hand settings ``HAND_SETTINGS`` on backend ``generic``, stores every row in
``extra_info["dln_table"]`` and prints the table (λ, λ̂ ± se, relative error) after the run's summary. The
issue's accuracy target (median |λ̂ − λ|/λ ≤ 15%, none above 40%) is for calibrated settings; this
benchmark asserts that every chain stays healthy and reports the hand settings' errors as they are. The
second runs the suite with hand settings and with calibrate's recommendation, prints both side by side and
asserts the target on the calibrated column (about 5× the first's time).
"""

from __future__ import annotations

import math
import statistics

import pytest

from fastllc.theory.dln import (BENCHMARK_CONFIGS, BENCHMARK_N, HAND_SETTINGS,
                                CalibratedSettings, benchmark_table, format_comparison, format_table)

pytestmark = pytest.mark.benchmark(min_rounds=1)


class TablePrinter:
    """A plugin registered during the run: its terminal summary prints the table after conftest's."""

    def __init__(self, title: str, rows: list[dict]):
        self.title, self.rows = title, rows

    def pytest_terminal_summary(self, terminalreporter):
        terminalreporter.write_line("")
        terminalreporter.write_line(self.title)
        for line in format_table(self.rows):
            terminalreporter.write_line("  " + line)


def test_dln_suite_hand_settings(benchmark, request):
    rows = []
    benchmark.pedantic(lambda: rows.extend(benchmark_table(BENCHMARK_CONFIGS, HAND_SETTINGS, n=BENCHMARK_N)),
                       rounds=1, iterations=1)
    settings = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in HAND_SETTINGS.items())
    title = f"DLN suite, λ̂ against Aoyagi's λ — hand settings (n={BENCHMARK_N}, nβ=n/log n, {settings})"
    request.config.pluginmanager.register(TablePrinter(title, rows), "dln-table-hand")
    benchmark.extra_info.update(dln_table=[{k: v for k, v in r.items() if k != "widths"} for r in rows],
                                settings=HAND_SETTINGS, n=BENCHMARK_N)
    assert len(rows) == len(BENCHMARK_CONFIGS) >= 10
    assert all(r["healthy"] == f"{HAND_SETTINGS['chains']}/{HAND_SETTINGS['chains']}" for r in rows)
    assert all(math.isfinite(r["llc_hat"]) and math.isfinite(r["se"]) for r in rows)


def test_dln_suite_calibrated(benchmark, request):
    """The suite again with calibrate's recommendation per network (``CalibratedSettings``: its default
    step scales ε·nβ·κ = 0.1, 0.05 at nβ = n/log n, γ = 1, then a fresh hand-sized estimate at the recommended cell),
    printed beside the hand settings' table; the issue's target is asserted: median |λ̂ − λ|/λ ≤ 15%, none
    above 40%."""
    hand, rows, settings = [], [], CalibratedSettings(BENCHMARK_N)

    def run():
        hand.extend(benchmark_table(BENCHMARK_CONFIGS, HAND_SETTINGS, n=BENCHMARK_N))
        rows.extend(benchmark_table(BENCHMARK_CONFIGS, settings, n=BENCHMARK_N))

    benchmark.pedantic(run, rounds=1, iterations=1)
    title = (f"DLN suite, hand settings against calibrate's recommendation (n={BENCHMARK_N}, nβ=n/log n, "
             "calibration grid: step scales ε·nβ·κ = 0.1, 0.05)")
    request.config.pluginmanager.register(ComparisonPrinter(title, hand, rows), "dln-table-calibrated")
    benchmark.extra_info.update(dln_hand=[{k: v for k, v in r.items() if k != "widths"} for r in hand],
                                dln_calibrated=[{k: v for k, v in r.items() if k != "widths"} for r in rows],
                                reasons={name: r.reason for name, r in settings.calibrations.items()})
    errors = [abs(r["rel_error"]) for r in rows]
    assert len(rows) == len(BENCHMARK_CONFIGS) and all(math.isfinite(e) for e in errors)
    assert statistics.median(errors) <= 0.15 and max(errors) <= 0.40


class ComparisonPrinter(TablePrinter):
    def __init__(self, title: str, hand: list[dict], calibrated: list[dict]):
        super().__init__(title, hand)
        self.calibrated = calibrated

    def pytest_terminal_summary(self, terminalreporter):
        terminalreporter.write_line("")
        terminalreporter.write_line(self.title)
        for line in format_comparison(self.rows, self.calibrated):
            terminalreporter.write_line("  " + line)
