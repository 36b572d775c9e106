"""Chain-steps per second of the triton backend beside the torch backend on the same GPU (published workload).

Skipped without CUDA. The triton rows are compiled kernels: run this module in a session that has not
imported ``fastllc.kernels`` under TRITON_INTERPRET=1 (e.g. not together with tests/test_backend_triton.py).
Both backends are first checked against the reference with injected noise on the benchmarked shapes.
Steps differ per C so that every round takes about a second; rates are per chain-step.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastllc import SGLDConfig
from fastllc.backends import reference
from fastllc.backends import torch as torch_backend
from fastllc.sampling import InjectedRandomness
from fastllc.sampling.contract import flat_parameters

from conftest import PUBLISHED, record

pytestmark = [pytest.mark.benchmark(min_rounds=1), pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="the triton backend needs CUDA")]

TRITON_RUNS = [(64, 2000), (1024, 500), (4096, 200)]
TORCH_CUDA_RUNS = [(64, 200), (1024, 50), (4096, 20)]  # host-side randomness: slower per step


@pytest.fixture(scope="session")
def kernels():
    from fastllc import kernels
    if kernels.INTERPRETED:
        pytest.skip("fastllc.kernels was defined under TRITON_INTERPRET=1 in this session: nothing compiled to time")
    return kernels


@pytest.fixture(scope="session")
def gpu_matches_reference(published, kernels):
    """Both GPU backends follow the reference parameter by parameter on the benchmarked shapes; the
    triton kernel's in-kernel randomness is exactly what ``kernels.draws`` gives the reference."""
    from fastllc.backends import triton as fused

    model, (x, y) = published
    chains, steps, m, d = 3, 10, PUBLISHED.batch_size, flat_parameters(model)[2].numel()
    noise = InjectedRandomness.seeded(chains, steps, len(y), m, d)
    config = SGLDConfig(chains=chains, steps=steps, batch_size=m, orthogonal=True)
    ref = reference.sample(model, x, y, F.cross_entropy, config, randomness=noise)
    for backend in (fused, torch_backend):
        fast = backend.sample(model, x, y, F.cross_entropy, config, randomness=noise, device="cuda")
        torch.testing.assert_close(fast.final_params, ref.final_params, rtol=0, atol=5e-5)  # as tests/test_backend_torch.py
        torch.testing.assert_close(fast.loss_trace, ref.loss_trace, rtol=0, atol=5e-5)
    seeded = fused.sample(model, x, y, F.cross_entropy, config, device="cuda")
    draws = kernels.draws(config.seed, chains, steps, len(y), m, d, device="cuda")
    ref = reference.sample(model, x, y, F.cross_entropy, config,
                           randomness=InjectedRandomness(draws[0].cpu(), draws[1].cpu()))
    torch.testing.assert_close(seeded.final_params, ref.final_params, rtol=0, atol=5e-5)
    return True


def _time(benchmark, backend_module, name, published, chains, steps):
    model, (x, y) = published
    config = SGLDConfig(chains=chains, steps=steps, batch_size=PUBLISHED.batch_size)
    backend_module.sample(model, x, y, F.cross_entropy, SGLDConfig(chains=chains, steps=2), device="cuda")  # warm
    seconds, peaks = [], []

    def run():
        torch.cuda.reset_peak_memory_stats()
        samples = backend_module.sample(model, x, y, F.cross_entropy, config, device="cuda")
        peaks.append(torch.cuda.max_memory_allocated())
        seconds.append(samples.seconds)
        assert torch.isfinite(samples.loss_trace).all()

    benchmark.pedantic(run, rounds=3, iterations=1)
    record(benchmark, name, PUBLISHED, chains, steps, seconds, gpu=torch.cuda.get_device_name(),
           peak_gpu_memory_mb=round(max(peaks) / 2**20, 1))


@pytest.mark.parametrize("chains,steps", TRITON_RUNS, ids=lambda v: str(v))
def test_triton_backend(benchmark, published, gpu_matches_reference, chains, steps):
    from fastllc.backends import triton as fused
    _time(benchmark, fused, "triton", published, chains, steps)


@pytest.mark.parametrize("chains,steps", TORCH_CUDA_RUNS, ids=lambda v: str(v))
def test_torch_backend_on_the_same_gpu(benchmark, published, gpu_matches_reference, chains, steps):
    _time(benchmark, torch_backend, "torch-cuda", published, chains, steps)
