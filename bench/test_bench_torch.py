"""Chain-steps per second of backend ``torch`` on the published workload (p=53, e=8, h=32, m=64); its peer
devinterp 1.3.2 is in test_bench_devinterp.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastllc import SGLDConfig
from fastllc.backends import torch as torch_backend

from conftest import PUBLISHED, assert_follows_reference, record

pytestmark = pytest.mark.benchmark(min_rounds=1)


@pytest.fixture(scope="session")
def torch_matches_reference(published):
    """The torch backend follows the reference parameter by parameter on the benchmarked shapes."""
    return assert_follows_reference(torch_backend, published)


def peak_rss_bytes() -> int | None:
    """Peak resident memory since the last reset (Linux), or None elsewhere."""
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


def reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


@pytest.mark.parametrize("chains,steps", [(64, 200), (256, 100), (1024, 40)], ids=lambda v: str(v))
def test_torch_backend(benchmark, published, torch_matches_reference, chains, steps):
    model, (x, y) = published
    config = SGLDConfig(chains=chains, steps=steps, batch_size=PUBLISHED.batch_size)
    torch_backend.sample(model, x, y, F.cross_entropy, SGLDConfig(chains=chains, steps=2))  # warm the Numba cache
    seconds, peaks = [], []

    def run():
        reset_peak_rss()
        before = peak_rss_bytes()
        samples = torch_backend.sample(model, x, y, F.cross_entropy, config)
        peaks.append((peak_rss_bytes() or 0) - (before or 0))
        seconds.append(samples.seconds)
        assert torch.isfinite(samples.loss_trace).all()

    benchmark.pedantic(run, rounds=3, iterations=1)
    record(benchmark, "torch", PUBLISHED, chains, steps, seconds, peak_rss_growth_mb=round(max(peaks) / 2**20, 1))
