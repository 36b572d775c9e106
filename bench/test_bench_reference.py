"""Chain-steps per second of backend ``reference`` on the published workload (p=53, e=8, h=32, m=64)."""

from __future__ import annotations

import pytest
import torch.nn.functional as F

from fastllc import SGLDConfig
from fastllc.backends import reference

from conftest import PUBLISHED, record

pytestmark = pytest.mark.benchmark(min_rounds=1)


def test_reference_backend(benchmark, published):
    model, (x, y) = published
    chains, steps = 64, 10  # one chain after another: its rate does not depend on C
    config = SGLDConfig(chains=chains, steps=steps, batch_size=PUBLISHED.batch_size)
    seconds = []

    def run():
        samples = reference.sample(model, x, y, F.cross_entropy, config)
        assert samples.init_loss == pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-6)
        seconds.append(samples.seconds)

    benchmark.pedantic(run, rounds=2, iterations=1)
    record(benchmark, "reference", PUBLISHED, chains, steps, seconds)
