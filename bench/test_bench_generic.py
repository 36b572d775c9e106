"""Backend ``generic`` (torch.func, any nn.Module) beside devinterp 1.3.2, in the same run.

Two workloads: a 784-128-10 MLP classifier on synthetic data with minibatches of 128, and the study's MLP
on the published workload. devinterp runs one chain after another, so its rate does not depend on C; it
is measured with torch's default threads and with one thread (its better setting on a busy 2-core CPU:
intra-op threads on small matmuls stall there), and ``generic`` is compared with both.
"""

from __future__ import annotations

import statistics
import time
import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastllc import SGLDConfig
from fastllc.backends import generic, reference
from fastllc.sampling import InjectedRandomness, wbic_nbeta
from fastllc.sampling.contract import flat_parameters

from conftest import PUBLISHED, record

pytestmark = pytest.mark.benchmark(min_rounds=1)


@dataclass(frozen=True)
class Classifier:
    """An MLP classifier inputs → hidden → classes (ReLU) on n synthetic examples, minibatches of m."""

    inputs: int = 784
    hidden: int = 128
    classes: int = 10
    batch_size: int = 128

    def name(self, chains: int, steps: int) -> str:
        return f"{self.family()}-C{chains}-T{steps}"

    def family(self) -> str:
        return f"mlp{self.inputs}-{self.hidden}-{self.classes}-m{self.batch_size}"

    def flops_per_chain_step(self) -> float:
        """Forward, weight gradients of both layers and the hidden-activation gradient, ×2 per multiply-add."""
        i, h, c, m = self.inputs, self.hidden, self.classes, self.batch_size
        return 2 * m * (2 * i * h + 3 * h * c)


CLASSIFIER = Classifier()


@pytest.fixture(scope="session")
def classifier():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(CLASSIFIER.inputs, CLASSIFIER.hidden), nn.ReLU(),
                          nn.Linear(CLASSIFIER.hidden, CLASSIFIER.classes))
    x = torch.randn(4096, CLASSIFIER.inputs)
    return model, (x, torch.randint(CLASSIFIER.classes, (4096,)))


def matches_reference(model, x, y, m) -> bool:
    """generic follows the reference parameter by parameter (injected noise, traced steps) before timing."""
    chains, steps, d = 3, 5, flat_parameters(model)[2].numel()
    noise = InjectedRandomness.seeded(chains, steps, len(y), m, d)
    config = SGLDConfig(chains=chains, steps=steps, batch_size=m, epsilon=1e-4, nbeta=20.0, orthogonal=True)
    ref = reference.sample(model, x, y, F.cross_entropy, config, randomness=noise)
    fast = generic.sample(model, x, y, F.cross_entropy, config, randomness=noise, trace=True)
    torch.testing.assert_close(fast.final_params, ref.final_params, rtol=0, atol=1e-5)  # as tests/test_backend_generic.py
    torch.testing.assert_close(fast.loss_trace, ref.loss_trace, rtol=0, atol=1e-5)
    return True


def time_generic(benchmark, workload, model, x, y, chains, steps):
    assert matches_reference(model, x, y, workload.batch_size)
    config = SGLDConfig(chains=chains, steps=steps, batch_size=workload.batch_size, epsilon=1e-5)
    seconds = []

    def run():  # steps ≥ 500 are traced; the trace is part of setup, outside ``samples.seconds``
        samples = generic.sample(model, x, y, F.cross_entropy, config)
        assert torch.isfinite(samples.loss_trace).all()
        seconds.append(samples.seconds)

    benchmark.pedantic(run, rounds=3, iterations=1)
    record(benchmark, "generic", workload, chains, steps, seconds)


def time_devinterp(benchmark, workload, model, x, y, chains, draws, threads):
    devinterp_sampler = pytest.importorskip("devinterp.slt.sampler")
    from devinterp.optim.sgld import SGLD
    from torch.utils.data import DataLoader, RandomSampler, TensorDataset

    dataset = TensorDataset(x, y)
    loader = DataLoader(dataset, batch_size=workload.batch_size,
                        sampler=RandomSampler(dataset, replacement=True, num_samples=10**7))
    init_loss = F.cross_entropy(model(x), y).item()

    def evaluate(net, batch):
        inputs, targets = batch
        return F.cross_entropy(net(inputs), targets), {}

    seconds, before = [], torch.get_num_threads()

    def run():
        torch.set_num_threads(threads or before)
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                devinterp_sampler.estimate_learning_coeff_with_summary(
                    model, loader, evaluate=evaluate, sampling_method=SGLD,
                    optimizer_kwargs=dict(lr=1e-5, localization=5.0, nbeta=wbic_nbeta(len(y))),
                    num_chains=chains, num_draws=draws, init_loss=init_loss, seed=0, device="cpu", verbose=False)
        finally:
            torch.set_num_threads(before)
        seconds.append(time.perf_counter() - start)

    benchmark.pedantic(run, rounds=2, iterations=1)
    name = "devinterp-1.3.2" + (f"-{threads}thread" if threads else "")
    record(benchmark, name, workload, chains, draws, seconds)
    return statistics.median(seconds)


@pytest.mark.parametrize("chains,steps", [(16, 500), (64, 500)], ids=lambda v: str(v))
def test_generic_classifier(benchmark, classifier, chains, steps):
    model, (x, y) = classifier
    time_generic(benchmark, CLASSIFIER, model, x, y, chains, steps)


@pytest.mark.parametrize("threads", [None, 1], ids=["default-threads", "one-thread"])
def test_devinterp_classifier(benchmark, classifier, threads):
    model, (x, y) = classifier
    time_devinterp(benchmark, CLASSIFIER, model, x, y, chains=2, draws=60, threads=threads)


@pytest.mark.parametrize("chains,steps", [(16, 1000), (64, 500)], ids=lambda v: str(v))
def test_generic_published(benchmark, published, chains, steps):
    model, (x, y) = published
    time_generic(benchmark, PUBLISHED, model, x, y, chains, steps)


@pytest.mark.parametrize("threads", [None, 1], ids=["default-threads", "one-thread"])
def test_devinterp_published(benchmark, published, threads):
    model, (x, y) = published
    time_devinterp(benchmark, PUBLISHED, model, x, y, chains=4, draws=100, threads=threads)
