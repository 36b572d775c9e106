"""A devinterp-style LLC script; only the import line differs between devinterp and fastllc.

    python examples/devinterp_switch.py devinterp    # devinterp 1.3.2
    python examples/devinterp_switch.py fastllc      # fastllc.compat.devinterp

A 2-layer classifier trained on synthetic data, then λ̂ with devinterp's usual settings. Both runs use the
same init_loss (the full-data loss at w*) so that their λ̂ differ only by sampling error.
"""

import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

if sys.argv[1:] == ["fastllc"]:  # runs without devinterp installed
    from fastllc.compat.devinterp import SGLD, estimate_learning_coeff_with_summary
else:
    from devinterp.optim.sgld import SGLD  # the sampler class devinterp scripts name (fastllc accepts it)
    from devinterp.slt.sampler import estimate_learning_coeff_with_summary

warnings.filterwarnings("ignore")
torch.manual_seed(0)
x = torch.randn(2048, 20)
y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()
model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 3))
optimiser = torch.optim.Adam(model.parameters(), 1e-2)
for _ in range(300):
    optimiser.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimiser.step()
loader = DataLoader(TensorDataset(x, y), batch_size=128, shuffle=True)


def evaluate(model, data):
    inputs, targets = data
    output = model(inputs)
    return F.cross_entropy(output, targets), {"output": output}


start = time.perf_counter()
summary = estimate_learning_coeff_with_summary(
    model, loader, evaluate=evaluate, sampling_method=SGLD,
    optimizer_kwargs=dict(lr=1e-4, localization=100.0, nbeta=50.0),
    num_chains=16, num_draws=400, num_burnin_steps=200, num_steps_bw_draws=1,
    init_loss=F.cross_entropy(model(x), y).item(), seed=0, device="cpu", verbose=False)
seconds = time.perf_counter() - start
per_chain = torch.tensor([summary[f"llc-chain/{i}"] for i in range(16)])
print(f"{sys.argv[1:] or ['devinterp']}: llc/mean = {summary['llc/mean']:.3f} ± {per_chain.std().item() / 4:.3f} (se), "
      f"llc/std = {summary['llc/std']:.3f}, loss/trace {tuple(summary['loss/trace'].shape)}, {seconds:.1f} s")
