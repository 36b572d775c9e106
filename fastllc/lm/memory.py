"""The memory plan of an LM run: bytes per chain estimated before anything is allocated, chains per group
chosen within ``max_memory``, groups run one after another.

Per chain, float32 (d the trainable weights, m the minibatch in sequences, T their length):
    state        4·d·(5 + [1 for RMSProp-SGLD's V]): its weights W, w*, the gradient G, the vmapped gradient
                 before it is gathered into G, the unit noise ξ, (V);
    activations  4·2·m·T·(L·(10·D + 3·F + 3·H·T) + 3·V): what autograd keeps per token for the backward
                 pass, ×2 for the gradients flowing back — per layer the residual stream, layer norms,
                 q, k, v and the attention output (≈10·D), the MLP's hidden units before and after the
                 activation and their gradient (3·F), the attention scores, probabilities and their
                 gradient (3·H·T per query); the logits, log-probabilities and their gradient (3·V).
Shared by all chains: the token data (inputs and targets, int64) and one chunk of the full-data pass at w*
(``models.CausalLM``: 512 sequences at a time). L_n(w*) alone is a pass without autograd, which holds only
the tensors alive at once in one layer, 4·(3·D + 2·F + 2·H·T + 3·V) bytes per token (the residual stream, a
norm's output and the attention output; the MLP's hidden units before and after the activation; the scores and
probabilities; the logits, log-probabilities and a temporary); ∇L_n(w*) as well (``orthogonal``) keeps a chunk's
activations for the backward pass, as a chain does (checkpointed: one chunk at a time).
An estimate from the shapes, checked against measured peaks (``bench/test_bench_lm_memory.py``, a 6-layer GPT-2,
16 chains): ``generic`` ran 3–8% over it in one group (hence ``HEADROOM``) and under it in groups of 4; the
``transformer`` backend needs about 40% of it (it keeps fewer activations), so its groups are smaller than
they need be.

A group of chains c ∈ [lo, hi) runs with its randomness keyed by the global chain index (``ChainOffset``):
chain c draws the same minibatches and noise as in a one-group run, so its trajectory is the same up to
fp32 rounding of the vmapped step (a batch of other chains may block the sums differently; equal bit for
bit in the tests on this CPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from .. import resources
from ..errors import FastLLCError
from ..sampling.samplers import Sampler, sampler_class
from ..validate import check_int
from .models import dimensions

DEFAULT_FRACTION = 0.5  # of the memory available when the run starts: room for everything else
# Groups are sized to fill this fraction of the budget: the estimate is from shapes, and measured peaks ran 3-8%
# over it (generic, 16 chains of a 6-layer GPT-2 in one group: bench/test_bench_lm_memory.py) through the
# allocator's fragmentation and the interpreter's own growth.
HEADROOM = Fraction(9, 10)  # exact: int(budget * HEADROOM) rounds the same everywhere
_CHUNK = 512  # CausalLM's default chunk of the full-data pass


@dataclass(frozen=True)
class MemoryPlan:
    chains: int
    per_group: int
    chain_bytes: int
    shared_bytes: int
    budget: int
    budget_source: str  # "max_memory" or "50% of the available memory"

    @property
    def groups(self) -> list[tuple[int, int]]:
        return [(lo, min(lo + self.per_group, self.chains)) for lo in range(0, self.chains, self.per_group)]

    def budget_for(self, per_group: int) -> int:
        """The smallest ``max_memory`` whose plan holds ``per_group`` chains in a group (these shapes)."""
        return math.ceil((self.shared_bytes + per_group * self.chain_bytes) / HEADROOM)

    def describe(self) -> str:
        f = resources.format_bytes
        return (f"memory plan: {self.chains} chains in {len(self.groups)} group(s) of at most {self.per_group}, "
                f"about {f(self.chain_bytes)} per chain + {f(self.shared_bytes)} shared, within "
                f"{f(self.budget)} ({self.budget_source})")


def _shape(model) -> tuple[int, int, int, int, int]:
    """(layers, width, heads, MLP width, vocabulary): ``models.dimensions``, the one reader of a model's config."""
    return tuple(dimensions(model)[:5])


def activation_bytes_per_token(model, length: int) -> int:
    layers, width, heads, hidden, vocab = _shape(model)
    return 4 * 2 * (layers * (10 * width + 3 * hidden + 3 * heads * length) + 3 * vocab)


def forward_bytes_per_token(model, length: int) -> int:
    """Bytes per token of a pass without autograd (the module docstring says which tensors)."""
    layers, width, heads, hidden, vocab = _shape(model)
    return 4 * (3 * width + 2 * hidden + 2 * heads * length + 3 * vocab)


def chain_bytes(model, batch_size: int, length: int, sampler="sgld") -> int:
    """Bytes one chain needs: W, W*, G, the noise and a direction (5 buffers of d floats), the sampler's own
    buffers (``Sampler.state_buffers``; ``sampler`` is a name or a sampler object), and its activations."""
    d = sum(p.numel() for p in model.parameters() if p.requires_grad)
    buffers = sampler.state_buffers if isinstance(sampler, Sampler) else sampler_class(sampler).state_buffers
    state = 4 * d * (5 + buffers)
    return state + batch_size * length * activation_bytes_per_token(model, length)


def plan(model, chains: int, batch_size: int, sequences: int, length: int, sampler="sgld",
         max_memory: int | None = None, full_gradient: bool = False) -> MemoryPlan:
    """Chains per group within ``max_memory`` bytes (default: ``DEFAULT_FRACTION`` of the available memory;
    no limit when that cannot be told). Refused when not even one chain fits. ``full_gradient``: the pass at w*
    also computes ∇L_n(w*) (the orthogonal restriction)."""
    per_chain = chain_bytes(model, batch_size, length, sampler)
    per_token = (activation_bytes_per_token if full_gradient else forward_bytes_per_token)(model, length)
    shared = 2 * 8 * sequences * length + min(sequences, _CHUNK) * length * per_token
    if max_memory is not None:
        budget, source = check_int("max_memory", max_memory, minimum=1), "max_memory"
    else:
        available = resources.available_memory_bytes()
        budget = int(available * DEFAULT_FRACTION) if available else None
        source = f"{DEFAULT_FRACTION:.0%} of the available memory"
        if budget is None:
            return MemoryPlan(chains, chains, per_chain, shared, 0, "the available memory is unknown: one group")
    fits = chains_within(budget, shared, per_chain)
    if fits < 1:
        f = resources.format_bytes
        raise FastLLCError(f"one chain needs about {f(per_chain)} and the data {f(shared)}, more than "
                           f"{float(HEADROOM):.0%} of {f(budget)} ({source}; the rest is headroom for the estimate's "
                           "error); lower batch_size or raise max_memory")
    return MemoryPlan(chains, int(min(chains, fits)), per_chain, shared, budget, source)


def chains_within(budget: int, shared: int, per_chain: int) -> int:
    """How many chains of ``per_chain`` bytes fit beside ``shared`` in ``HEADROOM`` of ``budget``."""
    return (int(budget * HEADROOM) - shared) // per_chain


class ChainOffset:
    """A counter-based randomness seen from a group of chains: local chain j is global chain ``offset`` + j."""

    def __init__(self, base, offset: int):
        self.base, self.offset = base, int(offset)

    def fill(self, chains: np.ndarray, step: int, indices, noise, blocks=None) -> None:
        self.base.fill(np.asarray(chains, dtype=np.int64) + self.offset, step, indices, noise, blocks)

    def draw(self, chain: int, step: int):
        return self.base.draw(chain + self.offset, step)
