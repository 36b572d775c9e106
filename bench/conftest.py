"""Benchmark suite: ``pytest bench --benchmark-only``.

Every benchmark names its workload in its id (p, e, h, m, C, T), checks its backend against the
reference before timing, and records chain-steps per second and the fraction of this CPU's FLOP
ceiling in ``extra_info``. A table of all backends side by side, with ratios, closes the run.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import pytest
import torch

from fastllc import ModularMLP, make_task

# float32 matmul peak of the 2-core development CPU, measured 2026-11-29 with torch (2048² sgemm: 81 GFLOP/s on
# one thread, 122 on two; 512²: 62 and 149). DESIGN.md's 80 GFLOP/s is one core's.
CPU_CEILING_FLOPS = 120e9
RESULTS: dict[str, dict] = {}


@dataclass(frozen=True)
class Workload:
    p: int
    embed: int
    hidden: int
    batch_size: int

    def name(self, chains: int, steps: int) -> str:
        return f"p{self.p}-e{self.embed}-h{self.hidden}-m{self.batch_size}-C{chains}-T{steps}"

    def family(self) -> str:
        return f"p{self.p}-e{self.embed}-h{self.hidden}-m{self.batch_size}"

    def flops_per_chain_step(self) -> float:
        """Multiply-adds of the three p×h products (forward, two backward) and the first layer, ×2."""
        p, e, h, m = self.p, self.embed, self.hidden, self.batch_size
        return 2 * (3 * m * h * p + 3 * m * 2 * e * h)


PUBLISHED = Workload(53, 8, 32, 64)


@pytest.fixture(scope="session")
def published():
    """The published workload's model (untrained: throughput does not depend on the weights) and train split."""
    torch.manual_seed(0)
    task = make_task(PUBLISHED.p, "add", seed=0)
    return ModularMLP(PUBLISHED.p, PUBLISHED.embed, PUBLISHED.hidden), task.train_data()


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
    fraction = rate * workload.flops_per_chain_step() / CPU_CEILING_FLOPS
    benchmark.extra_info.update(workload=workload.name(chains, steps), backend=backend,
                                chain_steps_per_second=round(rate), fraction_of_cpu_flop_ceiling=round(fraction, 4),
                                **extra)
    RESULTS[f"{backend} {workload.name(chains, steps)}"] = dict(backend=backend, family=workload.family(),
                                                              chains=chains, rate=rate, fraction=fraction, **extra)


def is_peer(backend: str) -> bool:
    """Backends every other one is compared against: the reference and outside libraries."""
    return backend == "reference" or backend.startswith("devinterp")


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    write = terminalreporter.write_line
    write("")
    write("chain-steps per second (median of rounds; sampler loop only)")
    hidden = ("backend", "family", "chains", "rate", "fraction")
    for name, r in sorted(RESULTS.items(), key=lambda item: (item[1]["family"], -item[1]["rate"])):
        extra = "".join(f"  {k}={v}" for k, v in r.items() if k not in hidden)
        write(f"  {name:<46} {r['rate']:>10,.0f}  {r['fraction']:6.1%} of CPU FLOP ceiling{extra}")
    for family in sorted({r["family"] for r in RESULTS.values()}):
        rows = [r for r in RESULTS.values() if r["family"] == family]
        for base in (r for r in rows if r["backend"] == "torch"):  # the fastest framework backend, at equal C
            for fast in (r for r in rows if r["chains"] == base["chains"] and r["backend"].startswith("native")):
                write(f"  {family}: {fast['backend']} / torch (C={base['chains']}): {fast['rate'] / base['rate']:.2f}x")
        for peer in (r for r in rows if is_peer(r["backend"])):
            for fast in (r for r in rows if not is_peer(r["backend"])):
                write(f"  {family}: {fast['backend']} (C={fast['chains']}) / {peer['backend']} (C={peer['chains']}): "
                      f"{fast['rate'] / peer['rate']:.1f}x")
