"""Chain-steps per second of backend ``native`` (the fused C++ kernel) on the published workload (p=53, e=8,
h=32, m=64), beside backend torch in the same run (``pytest bench --benchmark-only``)."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from fastllc import SGLDConfig
from fastllc.backends import native

from conftest import PUBLISHED, assert_follows_reference, record

pytestmark = pytest.mark.benchmark(min_rounds=1)


@pytest.fixture(scope="session")
def native_matches_reference(published):
    """The native backend follows the reference parameter by parameter on the benchmarked shapes."""
    reason = native.unavailable_reason()
    if reason is not None:
        pytest.skip(f"the native kernel does not build here: {reason}")
    return assert_follows_reference(native, published)


@pytest.mark.parametrize("chains,steps", [(64, 200), (256, 100), (1024, 40)], ids=lambda v: str(v))
def test_native_backend(benchmark, published, native_matches_reference, chains, steps):
    model, (x, y) = published
    config = SGLDConfig(chains=chains, steps=steps, batch_size=PUBLISHED.batch_size)
    native.sample(model, x, y, F.cross_entropy, SGLDConfig(chains=chains, steps=2))  # build and load the kernel
    seconds, cpu_seconds = [], []

    def run():
        cpu = time.process_time()
        samples = native.sample(model, x, y, F.cross_entropy, config)
        cpu_seconds.append(time.process_time() - cpu)
        seconds.append(samples.seconds)
        assert torch.isfinite(samples.loss_trace).all()

    benchmark.pedantic(run, rounds=3, iterations=1)
    cpu_per_chain_step = min(cpu_seconds) / (chains * steps)  # includes the start's forward/backward: an upper bound
    record(benchmark, "native", PUBLISHED, chains, steps, seconds, cpu_us_per_chain_step=round(cpu_per_chain_step * 1e6, 1))
