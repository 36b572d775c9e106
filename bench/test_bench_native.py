"""Chain-steps per second of backend ``native`` (the fused C++ kernel) on the published workload (p=53, e=8,
h=32, m=64), beside backend torch in the same run (``pytest bench --benchmark-only``). Every vector build this
CPU runs is timed ("native" is the default, the best; "native-avx2" beside it on an AVX-512 CPU)."""

from __future__ import annotations

import functools
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from fastllc import SGLDConfig, native_build
from fastllc.backends import native

from conftest import PUBLISHED, assert_follows_reference, record

pytestmark = pytest.mark.benchmark(min_rounds=1)


VECTOR_BUILDS = [v for v in native_build.variants() if v != "scalar"] or ["scalar"]


@pytest.fixture(scope="session")
def native_matches_reference(published):
    """Each build of the native backend follows the reference parameter by parameter on the benchmarked shapes."""
    reason = native.unavailable_reason()
    if reason is not None:
        pytest.skip(f"the native kernel does not build here: {reason}")
    builds = (SimpleNamespace(sample=functools.partial(native.sample, variant=v)) for v in VECTOR_BUILDS)
    return all(assert_follows_reference(build, published) for build in builds)


@pytest.mark.parametrize("variant", VECTOR_BUILDS)
@pytest.mark.parametrize("chains,steps", [(64, 200), (256, 100), (1024, 40)], ids=lambda v: str(v))
def test_native_backend(benchmark, published, native_matches_reference, chains, steps, variant):
    model, (x, y) = published
    config = SGLDConfig(chains=chains, steps=steps, batch_size=PUBLISHED.batch_size)
    native.sample(model, x, y, F.cross_entropy, SGLDConfig(chains=chains, steps=2), variant=variant)  # build, load
    seconds, cpu_seconds = [], []

    def run():
        cpu = time.process_time()
        samples = native.sample(model, x, y, F.cross_entropy, config, variant=variant)
        cpu_seconds.append(time.process_time() - cpu)
        seconds.append(samples.seconds)
        assert torch.isfinite(samples.loss_trace).all()

    benchmark.pedantic(run, rounds=3, iterations=1)
    cpu_per_chain_step = min(cpu_seconds) / (chains * steps)  # includes the start's forward/backward: an upper bound
    name = "native" if variant == VECTOR_BUILDS[0] else f"native-{variant}"
    record(benchmark, name, PUBLISHED, chains, steps, seconds, build=variant,
           cpu_us_per_chain_step=round(cpu_per_chain_step * 1e6, 1))
