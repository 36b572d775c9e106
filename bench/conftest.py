"""Benchmark suite: ``pytest bench --benchmark-only``.

Every benchmark names its workload in its id (p, e, h, m, C, T; "trained" when the network is), checks its
backend against the reference before timing, and records chain-steps per second and the fraction of this
CPU's FLOP ceiling in ``extra_info``. The ceiling is measured in the same run (``cpu_flop_ceiling``: torch's
sgemm on every core, at the kernel's sizes and at a large size). A table of all backends side by side, with
ratios, closes the run, headed by the CPU's name, its vector extensions and the measured ceiling.
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from fastllc import ModularMLP, make_task

RESULTS: dict[str, dict] = {}


def _sgemm_flops(a: torch.Tensor, b: torch.Tensor, seconds: float = 0.5) -> tuple[float, float]:
    """FLOP/s of ``a @ b`` (batched or not), the best of repeats over about ``seconds``: per second of wall time,
    and per second of this process's CPU time (what other processes on the machine take is not counted)."""
    flops = 2 * a.shape[-2] * a.shape[-1] * b.shape[-1] * (a.shape[0] if a.dim() == 3 else 1)
    torch.matmul(a, b)
    wall = cpu = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start, start_cpu = time.perf_counter(), time.process_time()
        torch.matmul(a, b)
        wall, cpu = min(wall, time.perf_counter() - start), min(cpu, time.process_time() - start_cpu)
    return flops / wall, flops / max(cpu, 1e-9)


@functools.lru_cache(maxsize=None)
def cpu_flop_ceiling() -> dict:
    """This CPU's float32 matmul peak, measured at the first benchmark's record (``measure_sgemm``)."""
    return measure_sgemm()


def best_ceiling() -> dict:
    """The first measurement and one more at the end of the run, the best of each figure: other processes on a
    shared machine lower a measurement for a while, never raise it."""
    first, last = cpu_flop_ceiling(), measure_sgemm()
    return {k: max(first[k], last[k]) if k != "load" else first[k] for k in first}


def measure_sgemm() -> dict:
    """This CPU's float32 matmul peak, measured now with torch's sgemm on every core (threads as the backends
    use): at the kernel's sizes (a batch of the [p, h]·[h, m] products of the published shape) and at 2048²;
    one thread at 2048² too. The ceiling is the best of them. Other processes on the machine lower both the
    ceiling and the rates measured beside it."""
    from fastllc.sampling.threads import available_cores
    threads, previous = available_cores(), torch.get_num_threads()
    gen = torch.Generator().manual_seed(0)
    large = torch.randn(2048, 2048, generator=gen), torch.randn(2048, 2048, generator=gen)
    p, h, m = PUBLISHED.p, PUBLISHED.hidden, PUBLISHED.batch_size
    small = torch.randn(256, p, h, generator=gen), torch.randn(256, h, m, generator=gen)
    try:
        torch.set_num_threads(1)
        one_thread, one_thread_cpu = _sgemm_flops(*large)
        torch.set_num_threads(threads)
        (kernel_sizes, _), (large_size, _) = _sgemm_flops(*small), _sgemm_flops(*large)
    finally:
        torch.set_num_threads(previous)
    return dict(threads=threads, kernel_sizes=kernel_sizes, large=large_size, one_thread_large=one_thread,
                one_thread_large_cpu=one_thread_cpu, ceiling=max(kernel_sizes, large_size),
                load=os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"))


def cpu_description() -> str:
    """The CPU's model name and the vector extensions the native kernel can use."""
    from fastllc import native_build
    flags = native_build.cpu_flags()
    wanted = ("avx2", "fma", "avx512f", "avx512dq", "avx512vl", "avx512bw", "avx512_vnni", "avx512_bf16")
    return f"{native_build.cpu_name()} ({' '.join(f for f in wanted if f in flags) or 'no AVX'})"


@dataclass(frozen=True)
class Workload:
    p: int
    embed: int
    hidden: int
    batch_size: int
    network: str = ""  # "trained": a trained network (confident predictions, subnormal probabilities)

    def name(self, chains: int, steps: int) -> str:
        return f"{self.family()}-C{chains}-T{steps}"

    def family(self) -> str:
        shape = f"p{self.p}-e{self.embed}-h{self.hidden}-m{self.batch_size}"
        return f"{shape}-{self.network}" if self.network else shape

    def flops_per_chain_step(self) -> float:
        """Multiply-adds of the three p×h products (forward, two backward) and the first layer, ×2."""
        p, e, h, m = self.p, self.embed, self.hidden, self.batch_size
        return 2 * (3 * m * h * p + 3 * m * 2 * e * h)


PUBLISHED = Workload(53, 8, 32, 64)
TRAINED = Workload(53, 8, 32, 64, network="trained")


@pytest.fixture(scope="session")
def published():
    """The published workload's model, untrained, and its train split."""
    torch.manual_seed(0)
    task = make_task(PUBLISHED.p, "add", seed=0)
    return ModularMLP(PUBLISHED.p, PUBLISHED.embed, PUBLISHED.hidden), task.train_data()


@pytest.fixture(scope="session")
def trained():
    """The published workload's network trained as ``fastllc estimate --p 53`` trains it (15,000 batches; once,
    cached in FASTLLC_HOME's runs, the same run that command uses), and its train split. Throughput depends on
    the weights: a trained network's confident predictions make subnormal floats, slow on some CPUs."""
    from fastllc.storage import fastllc_home
    from fastllc.train import TrainConfig, cached_run, default_batches
    config = TrainConfig(p=TRAINED.p, embed=TRAINED.embed, hidden=TRAINED.hidden, batches=default_batches(TRAINED.p))
    run = cached_run(config, fastllc_home())
    return run.load_model(), run.task().train_data()


def assert_follows_reference(backend, published) -> bool:
    """``backend`` (a backend module) follows the reference parameter by parameter on the published shape,
    with the same injected noise: 3 chains × 10 orthogonal steps (tolerance as in its tests/test_backend_*.py)."""
    import torch.nn.functional as F

    from fastllc import SGLDConfig
    from fastllc.backends import reference
    from fastllc.sampling import InjectedRandomness
    from fastllc.sampling.contract import flat_parameters

    model, (x, y) = published
    chains, steps, m, d = 3, 10, PUBLISHED.batch_size, flat_parameters(model)[2].numel()
    noise = InjectedRandomness.seeded(chains, steps, len(y), m, d)
    config = SGLDConfig(chains=chains, steps=steps, batch_size=m, orthogonal=True)
    ref = reference.sample(model, x, y, F.cross_entropy, config, randomness=noise)
    fast = backend.sample(model, x, y, F.cross_entropy, config, randomness=noise)
    torch.testing.assert_close(fast.final_params, ref.final_params, rtol=0, atol=5e-5)
    torch.testing.assert_close(fast.loss_trace, ref.loss_trace, rtol=0, atol=5e-5)
    return True


def record(benchmark, backend: str, workload, chains: int, steps: int, seconds: list[float], **extra):
    """Store chain-steps/s (median over rounds of the sampler's own loop time) beside the timing.

    ``workload`` has ``name(chains, steps)``, ``family()`` (the name without C and T: results of one family
    are compared) and ``flops_per_chain_step()``.
    """
    rate = chains * steps / statistics.median(seconds)
    fraction = rate * workload.flops_per_chain_step() / cpu_flop_ceiling()["ceiling"]
    benchmark.extra_info.update(workload=workload.name(chains, steps), backend=backend,
                                chain_steps_per_second=round(rate), fraction_of_cpu_flop_ceiling=round(fraction, 4),
                                cpu_flop_ceiling=round(cpu_flop_ceiling()["ceiling"]), **extra)
    RESULTS[f"{backend} {workload.name(chains, steps)}"] = dict(
        backend=backend, family=workload.family(), chains=chains, rate=rate,
        flops_per_chain_step=workload.flops_per_chain_step(), **extra)


def is_peer(backend: str) -> bool:
    """Backends every other one is compared against: the reference and outside libraries."""
    return backend == "reference" or backend.startswith("devinterp")


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    write = terminalreporter.write_line
    ceiling = best_ceiling()
    for r in RESULTS.values():  # against the best ceiling measured in the run
        r["fraction"] = r["rate"] * r.pop("flops_per_chain_step") / ceiling["ceiling"]
    write("")
    write(f"CPU: {cpu_description()}")
    write(f"float32 sgemm (torch, measured in this run): {ceiling['threads']} threads {ceiling['large'] / 1e9:,.0f} "
          f"GFLOP/s at 2048², {ceiling['kernel_sizes'] / 1e9:,.0f} at the kernel's sizes (256 × [53, 32]·[32, 64]); "
          f"one thread {ceiling['one_thread_large'] / 1e9:,.0f} at 2048² ({ceiling['one_thread_large_cpu'] / 1e9:,.0f} per "
          f"CPU-second); the best of the run's first and last measurements. Ceiling: {ceiling['ceiling'] / 1e9:,.0f} "
          f"GFLOP/s. Load average at the first: {ceiling['load']:.1f} (other processes lower the ceiling and the rates)")
    write("chain-steps per second (median of rounds; sampler loop only; % of the ceiling: the products' FLOPs)")
    hidden = ("backend", "family", "chains", "rate", "fraction")
    for name, r in sorted(RESULTS.items(), key=lambda item: (item[1]["family"], -item[1]["rate"])):
        extra = "".join(f"  {k}={v}" for k, v in r.items() if k not in hidden)
        write(f"  {name:<54} {r['rate']:>10,.0f}  {r['fraction']:6.1%} of CPU FLOP ceiling{extra}")
    for family in sorted({r["family"] for r in RESULTS.values()}):
        rows = [r for r in RESULTS.values() if r["family"] == family]
        for base in (r for r in rows if r["backend"] == "torch"):  # the fastest framework backend, at equal C
            for fast in (r for r in rows if r["chains"] == base["chains"] and r["backend"].startswith("native")):
                write(f"  {family}: {fast['backend']} / torch (C={base['chains']}): {fast['rate'] / base['rate']:.2f}x")
        for peer in (r for r in rows if is_peer(r["backend"])):
            for fast in (r for r in rows if not is_peer(r["backend"])):
                write(f"  {family}: {fast['backend']} (C={fast['chains']}) / {peer['backend']} (C={peer['chains']}): "
                      f"{fast['rate'] / peer['rate']:.1f}x")
    for trained in (r for r in RESULTS.values() if r["family"].endswith("-trained")):  # the weights' effect
        for untrained in (r for r in RESULTS.values() if r["family"] == trained["family"].removesuffix("-trained")
                          and r["backend"] == trained["backend"] and r["chains"] == trained["chains"]):
            write(f"  {trained['backend']} (C={trained['chains']}): trained / untrained network: "
                  f"{trained['rate'] / untrained['rate']:.2f}")


# A workload shared by the groups and observables benchmarks.
@dataclass(frozen=True)
class DeepMLP:
    """inputs → width → width → width → classes, Tanh between the four Linear layers; minibatches of m."""

    inputs: int = 64
    width: int = 64
    classes: int = 10
    batch_size: int = 64

    def name(self, chains: int, steps: int) -> str:
        return f"{self.family()}-C{chains}-T{steps}"

    def family(self) -> str:
        return f"mlp4x{self.width}-{self.inputs}-{self.classes}-m{self.batch_size}"

    def flops_per_chain_step(self) -> float:
        """Forward, weight gradients and input gradients of the four layers (the first's input gradient is not
        needed), ×2 per multiply-add."""
        i, w, c, m = self.inputs, self.width, self.classes, self.batch_size
        products = i * w + 2 * w * w + w * c
        return 2 * m * (3 * products - i * w)

    def module(self) -> nn.Module:
        """The network, initialised from torch's current generator."""
        widths = [self.inputs, self.width, self.width, self.width, self.classes]
        layers = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.Tanh()]
        return nn.Sequential(*layers[:-1])
