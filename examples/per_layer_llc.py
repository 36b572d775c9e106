"""Per-layer λ̂ of your own model in one batched run (``fastllc.api.estimate_groups``).

    python examples/per_layer_llc.py

A 4-layer MLP trained briefly on synthetic data; then λ̂ of the whole model, and of each layer with the
other layers fixed at w* (the weight-restricted, "refined" LLC), every layer's chains in one batch.
About a minute of CPU time.
"""

import warnings

import torch
import torch.nn.functional as F
from torch import nn

import fastllc
from fastllc.api import estimate_groups

warnings.filterwarnings("ignore", category=RuntimeWarning)  # unhealthy chains are in the table anyway
torch.manual_seed(0)
x = torch.randn(4096, 32)
y = (x[:, :10] + 0.3 * torch.randn(4096, 10)).argmax(dim=1)
model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                      nn.Linear(64, 10))
optimiser = torch.optim.Adam(model.parameters(), 3e-3)
for _ in range(300):
    optimiser.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimiser.step()

settings = dict(chains=8, steps=500, burn_in=100, epsilon=1e-4, gamma=100.0, batch_size=64)
whole = fastllc.estimate(model, (x, y), **settings)
print(f"whole model: λ̂ = {whole.llc_mean:.2f} ± {whole.llc_se:.2f} ({whole.healthy_chains}/{whole.chains} healthy)")
layers = estimate_groups(model, (x, y), groups="per-module", **settings)  # one group per Linear: "0", "2", ...
print(layers.table())
print(f"one batch of {sum(r.chains for r in layers.values())} chains, "
      f"{next(iter(layers.values())).sampling_seconds:.1f} s")
