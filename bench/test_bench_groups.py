"""Per-layer λ̂ in one batched run (``estimate_groups``) against one unrestricted run of as many chains.

Workload: a 4-layer MLP (nn.Sequential of 4 Linear with Tanh between, 64 → 64 → 64 → 64 → 10) on synthetic
data, minibatches of 64, backend ``generic``. The grouped run has one group per layer (``groups="per-module"``),
``chains`` chains each, so 4·chains chains in one batch; the unrestricted run has 4·chains chains. Both record
the sampler loop's own time (``LLCResult.sampling_seconds``: the trace and the start are setup); rounds
alternate the two so that a busy machine slows both alike. Target: grouped / unrestricted ≤ 1.5.
"""

from __future__ import annotations

import statistics

import pytest
import torch
import torch.nn.functional as F

from fastllc import SGLDConfig, estimate
from fastllc.api import estimate_groups
from fastllc.backends import generic, reference
from fastllc.sampling import InjectedRandomness
from fastllc.sampling.contract import flat_parameters
from fastllc.sampling.restrict import group_masks

from conftest import DeepMLP, record

pytestmark = pytest.mark.benchmark(min_rounds=1)
TARGET_RATIO = 1.5


MLP = DeepMLP()


@pytest.fixture(scope="module")
def deep_mlp():
    torch.manual_seed(0)
    model = MLP.module()
    x = torch.randn(4096, MLP.inputs)
    y = (x[:, :MLP.classes] + 0.3 * torch.randn(4096, MLP.classes)).argmax(dim=1)  # a learnable labelling
    optimiser = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(200):  # near a minimum, so that λ̂ means something (timing does not depend on the weights)
        optimiser.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimiser.step()
    return model, (x, y)


def grouped_follows_reference(model, x, y) -> bool:
    """generic follows the reference parameter by parameter with one layer's mask per chain (injected noise,
    traced steps, orthogonal): 4 chains (one per layer) × 5 steps, tolerance as in tests/test_groups.py."""
    masks = torch.stack(list(group_masks(model, "per-module").values()))
    chains, steps, d = len(masks), 5, flat_parameters(model)[2].numel()
    noise = InjectedRandomness.seeded(chains, steps, len(y), MLP.batch_size, d)
    config = SGLDConfig(chains=chains, steps=steps, batch_size=MLP.batch_size, epsilon=1e-3, nbeta=20.0,
                        orthogonal=True)
    ref = reference.sample(model, x, y, F.cross_entropy, config, randomness=noise, restrict=masks)
    fast = generic.sample(model, x, y, F.cross_entropy, config, randomness=noise, restrict=masks, trace=True)
    torch.testing.assert_close(fast.final_params, ref.final_params, rtol=0, atol=1e-5)
    torch.testing.assert_close(fast.loss_trace, ref.loss_trace, rtol=0, atol=1e-5)
    w_star = flat_parameters(model)[2]
    for c in range(chains):  # every chain moved only its own layer
        assert torch.equal(fast.final_params[c, ~masks[c]], w_star[~masks[c]])
    return True


@pytest.mark.parametrize("chains_per_layer,steps", [(8, 500)], ids=lambda v: str(v))
def test_per_layer_llc_in_one_batch_costs_about_one_unrestricted_run(benchmark, deep_mlp, chains_per_layer, steps):
    model, (x, y) = deep_mlp
    assert grouped_follows_reference(model, x, y)
    total = 4 * chains_per_layer
    settings = dict(steps=steps, batch_size=MLP.batch_size, epsilon=1e-4, gamma=100.0, backend="generic")
    grouped_seconds, plain_seconds, last = [], [], {}

    def run():
        grouped = estimate_groups(model, (x, y), groups="per-module", chains=chains_per_layer, **settings)
        plain = estimate(model, (x, y), chains=total, **settings)
        assert all(r.healthy_chains == chains_per_layer for r in grouped.values()) and plain.healthy_chains == total
        grouped_seconds.append(next(iter(grouped.values())).sampling_seconds)
        plain_seconds.append(plain.sampling_seconds)
        last.update(grouped=grouped, plain=plain)

    benchmark.pedantic(run, rounds=3, iterations=1)
    ratio = statistics.median(grouped_seconds) / statistics.median(plain_seconds)
    layers = {name: f"{r.llc_mean:.2f}±{r.llc_se:.2f}" for name, r in last["grouped"].items()}
    record(benchmark, "generic-per-layer", MLP, total, steps, grouped_seconds, cost_ratio=round(ratio, 3),
           per_layer_llc=layers)
    record(benchmark, "generic", MLP, total, steps, plain_seconds,
           llc=f"{last['plain'].llc_mean:.2f}±{last['plain'].llc_se:.2f}")
    print(f"\nper-layer (4 groups × {chains_per_layer} chains) / unrestricted ({total} chains), {steps} steps: "
          f"{statistics.median(grouped_seconds):.2f} s / {statistics.median(plain_seconds):.2f} s = {ratio:.2f}x "
          f"(target ≤ {TARGET_RATIO}); per layer λ̂ {layers}; unrestricted {last['plain'].llc_mean:.2f}")
    assert ratio <= TARGET_RATIO
