"""A devinterp 2-style LLC script; only the import line differs between devinterp 2.0.1 and fastllc.

    python examples/devinterp2_switch.py devinterp    # devinterp 2.0.1 (its own environment: pip install devinterp==2.0.1)
    python examples/devinterp2_switch.py fastllc      # fastllc.compat.devinterp2 (pip install 'fastllc[lm]')

A tiny GPT-2 trained for a few seconds on arithmetic progressions mod 32, then λ̂ of the whole model and of one
attention head with the same settings. Both see the same minibatches (devinterp's seeded loader) and the same
L̂_n(w*); their SGLD noise differs, so λ̂ agrees within its standard error, not digit for digit.
"""

import math
import sys
import time
import warnings

import numpy as np
import torch
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel

if sys.argv[1:] == ["fastllc"]:  # runs without devinterp installed
    from fastllc.compat.devinterp2 import create_param_masks, llc
else:
    from devinterp.slt.llc import llc
    from devinterp.slt.weight_restrictions import create_param_masks

warnings.filterwarnings("ignore")
torch.set_num_threads(1)
torch.manual_seed(0)
g = torch.Generator().manual_seed(0)
tokens = (torch.randint(0, 32, (128, 1), generator=g) + torch.randint(1, 4, (128, 1), generator=g)
          * torch.arange(16)) % 32
model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=32, n_positions=16, resid_pdrop=0.0,
                                   embd_pdrop=0.0, attn_pdrop=0.0))
optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
for _ in range(150):
    loss = model(input_ids=tokens, labels=tokens).loss
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()
dataset = Dataset.from_dict({"input_ids": tokens.tolist()}).with_format("torch")

settings = dict(lr=3e-4, n_beta=30.0, num_chains=8, num_draws=60, num_burnin_steps=20, batch_size=16,
                localization=100.0, num_init_loss_batches=4)
for name, masks in (("all weights", None), ("head l1h2", create_param_masks(model, "l1h2"))):
    start = time.perf_counter()
    result = llc(model, dataset, {"train": dataset}, param_masks=masks, **settings)
    per_chain = result["llc_per_chain"].values
    se = np.std(per_chain, ddof=1) / math.sqrt(len(per_chain))
    print(f"{sys.argv[1:] or ['devinterp']} {name}: llc_mean = {float(result['llc_mean']):.3f} ± {se:.3f} (se), "
          f"init_loss = {float(result['init_loss']):.6f}, loss_trace {tuple(result['loss_trace'].shape)}, "
          f"{time.perf_counter() - start:.1f} s")
