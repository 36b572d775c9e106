"""Chain-steps per second of backend ``native`` (the fused C++ kernel) on the published workload (p=53, e=8,
h=32, m=64), untrained and trained, beside backend torch in the same run (``pytest bench --benchmark-only``).
Every vector build this CPU runs is timed ("native" is the default, the one chosen by timing at first build;
"native-<build>" the others). Backend torch on the untrained network is in test_bench_torch.py; on the trained
one, here."""

from __future__ import annotations

import functools
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from fastllc import SGLDConfig, native_build
from fastllc.backends import native
from fastllc.backends import torch as torch_backend

from conftest import PUBLISHED, TRAINED, assert_follows_reference, record

pytestmark = pytest.mark.benchmark(min_rounds=1)


VECTOR_BUILDS = [v for v in native_build.variants() if v != "scalar"] or ["scalar"]
NETWORKS = {"untrained": PUBLISHED, "trained": TRAINED}


@pytest.fixture(scope="session")
def native_matches_reference(published, trained):
    """Each build of the native backend follows the reference parameter by parameter on the benchmarked shapes
    and networks."""
    reason = native.unavailable_reason()
    if reason is not None:
        pytest.skip(f"the native kernel does not build here: {reason}")
    builds = [SimpleNamespace(sample=functools.partial(native.sample, variant=v)) for v in VECTOR_BUILDS]
    return all(assert_follows_reference(build, network) for build in builds for network in (published, trained))


@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("variant", VECTOR_BUILDS)
@pytest.mark.parametrize("chains,steps", [(64, 200), (256, 100), (1024, 40)], ids=lambda v: str(v))
def test_native_backend(benchmark, request, native_matches_reference, chains, steps, variant, network):
    model, (x, y) = request.getfixturevalue("published" if network == "untrained" else "trained")
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
    name = "native" if variant == native_build.default_variant() else f"native-{variant}"
    record(benchmark, name, NETWORKS[network], chains, steps, seconds, build=variant,
           cpu_us_per_chain_step=round(cpu_per_chain_step * 1e6, 1))


@pytest.fixture(scope="session")
def torch_matches_reference_trained(trained):
    return assert_follows_reference(torch_backend, trained)


@pytest.mark.parametrize("chains,steps", [(64, 200), (256, 100)], ids=lambda v: str(v))
def test_torch_backend_trained(benchmark, trained, torch_matches_reference_trained, chains, steps):
    """Backend torch on the trained network: native's peer on the same weights (as test_bench_torch.py)."""
    model, (x, y) = trained
    config = SGLDConfig(chains=chains, steps=steps, batch_size=TRAINED.batch_size)
    torch_backend.sample(model, x, y, F.cross_entropy, SGLDConfig(chains=chains, steps=2))  # warm the Numba cache
    seconds = []

    def run():
        samples = torch_backend.sample(model, x, y, F.cross_entropy, config)
        seconds.append(samples.seconds)
        assert torch.isfinite(samples.loss_trace).all()

    benchmark.pedantic(run, rounds=3, iterations=1)
    record(benchmark, "torch", TRAINED, chains, steps, seconds)
