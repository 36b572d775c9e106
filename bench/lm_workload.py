"""The language-model workload of the LM benchmarks (bench/test_bench_lm.py, test_bench_transformer.py,
devinterp2_rate.py): a tiny GPT-2 (2 layers, 4 heads, width 64, vocabulary 64, context 32; 106k parameters, dropout
off so that devinterp 2's training-mode evaluation is the same function) trained for a few seconds on 8,192 sequences
of a random sparse Markov chain, and the SGLD settings every LM benchmark runs. Imported both by the main
environment's benchmarks and by the script run in devinterp 2.0.1's environment: no pytest, no fastllc import."""

from __future__ import annotations

from dataclasses import dataclass

import torch

SGLD = dict(steps=200, batch_size=16, epsilon=5e-5, gamma=1000.0, nbeta=1000.0, seed=0)


@dataclass(frozen=True)
class TinyGPT2:
    layers: int = 2
    heads: int = 4
    width: int = 64
    vocab: int = 64
    context: int = 32
    sequences: int = 8192
    batch_size: int = 16

    def name(self, chains: int, steps: int) -> str:
        return f"{self.family()}-C{chains}-T{steps}"

    def family(self) -> str:
        return f"gpt2-l{self.layers}h{self.heads}d{self.width}v{self.vocab}t{self.context}-m{self.batch_size}"

    def flops_per_chain_step(self) -> float:
        """Forward and backward (×3) of the matmuls: 2 FLOP per multiply-add per token, weights of every
        layer (4d² attention + 8d² MLP) and the unembedding, plus attention's two T×T products per layer."""
        d, t, tokens = self.width, self.context, self.batch_size * self.context
        matmul_weights = self.layers * 12 * d * d + d * self.vocab
        attention = self.layers * 2 * t * d  # per token: scores and weighted values
        return 3 * 2 * tokens * (matmul_weights + attention)


WORKLOAD = TinyGPT2()


def markov_tokens(n, length, vocab, seed=0):
    """Sequences of a random sparse Markov chain (each token has 4 likely successors)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.full((vocab, vocab), -4.0)
    logits.scatter_(1, torch.randint(vocab, (vocab, 4), generator=g), 2.0)
    transition = logits.softmax(dim=1)
    seqs = torch.empty(n, length, dtype=torch.long)
    seqs[:, 0] = torch.randint(vocab, (n,), generator=g)
    for t in range(1, length):
        seqs[:, t] = torch.multinomial(transition[seqs[:, t - 1]], 1, generator=g).squeeze(1)
    return seqs


def train(workload: TinyGPT2 = WORKLOAD, seed: int = 0):
    """(the model in eval mode, its sequences [n, T]): 300 Adam steps from a seeded initialisation (a few seconds:
    the loss falls from ~4.2 towards the chain's entropy)."""
    import transformers
    torch.manual_seed(seed)
    w = workload
    config = transformers.GPT2Config(n_layer=w.layers, n_head=w.heads, n_embd=w.width, vocab_size=w.vocab,
                                     n_positions=w.context, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config)
    tokens = markov_tokens(w.sequences, w.context, w.vocab)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(300):
        batch = tokens[torch.randint(len(tokens), (64,))]
        loss = model(input_ids=batch, labels=batch).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval(), tokens
