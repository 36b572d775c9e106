"""λ̂ along training of a tiny GPT-2: save checkpoints while training, then every checkpoint's λ̂ in one batched
run (fastllc.lm.estimate_series), its table and a plot.

    python examples/lm_series.py --out runs/lm-series            # trains (~10 s), estimates, writes llc.png

The same from the command line, on the directory this script writes:

    fastllc lm estimate --series runs/lm-series/checkpoints runs/lm-series/tokens.npy \\
        --chains 6 --steps 300 --burn-in 100 --batch-size 16 --epsilon 3e-4 --gamma 100 --nbeta 30 --plot llc.png

The language: arithmetic progressions mod 32 (a random start and step per sequence), which a 2-layer GPT-2
learns within a few hundred Adam steps; checkpoints at steps 0, 10, 20, 40, ..., 640.
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

import fastllc.lm

torch.set_num_threads(1)  # tiny tensors: one thread is fastest, and steady when other processes load the CPU
transformers.utils.logging.disable_progress_bar()
VOCAB, LENGTH = 32, 16
CHECKPOINTS = [0, 10, 20, 40, 80, 160, 320, 640]


def sequences(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    start, step = torch.randint(0, VOCAB, (n, 1), generator=g), torch.randint(1, 4, (n, 1), generator=g)
    return (start + step * torch.arange(LENGTH)) % VOCAB


def train(out: Path, tokens: torch.Tensor) -> None:
    """Adam on the next-token loss, saving the model (save_pretrained) at each step of CHECKPOINTS."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=VOCAB, n_positions=LENGTH, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(CHECKPOINTS[-1] + 1):
        if step in CHECKPOINTS:
            model.save_pretrained(out / "checkpoints" / f"step{step}")
        batch = tokens[torch.randint(len(tokens), (32,))]
        loss = model(input_ids=batch, labels=batch).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/lm-series"))
    args = parser.parse_args()
    tokens = sequences(256)
    start = time.perf_counter()
    train(args.out, tokens)
    np.save(args.out / "tokens.npy", tokens.numpy())
    print(f"trained and saved {len(CHECKPOINTS)} checkpoints in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    series = fastllc.lm.estimate_series(str(args.out / "checkpoints"), tokens, chains=6, steps=300, burn_in=100,
                                        batch_size=16, epsilon=3e-4, gamma=100.0, nbeta=30.0)
    print(series.table())
    print(f"{len(series)} checkpoints × 6 chains in one batched run: {time.perf_counter() - start:.1f} s")
    print("plot:", series.plot(args.out / "llc.png", title="tiny GPT-2 on arithmetic progressions"))


if __name__ == "__main__":
    main()
