"""Where each chain's minibatches and Gaussian noise come from.

``CounterRandomness``: the minibatch indices and standard-normal noise of chain c at step t depend only
on (seed, c, t). Steps are grouped in fixed blocks of ``BLOCK_STEPS``; block k of chain c is drawn from a
generator seeded with derive_seed(seed, "sgld", c, k). So chain 3 follows the same trajectory whether 4
or 64 chains run, and whatever the backend's own batching.

``InjectedRandomness``: indices and noise given as tensors, so that two backends can be made to follow
the same trajectory and be compared parameter by parameter.

Both return *unit* noise; the sampler scales it by √ε of the chain.
"""

from __future__ import annotations

import torch

from ..errors import FastLLCError
from ..seeding import generator

BLOCK_STEPS = 32  # part of the stream's definition: changing it changes every trajectory


class CounterRandomness:
    def __init__(self, seed: int, n: int, batch_size: int, dim: int):
        self.seed, self.n, self.batch_size, self.dim = seed, n, batch_size, dim
        self._cached: tuple[int, int] | None = None
        self._block: tuple[torch.Tensor, torch.Tensor] | None = None

    def _draw_block(self, chain: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = generator(self.seed, "sgld", chain, block)
        indices = torch.randint(self.n, (BLOCK_STEPS, self.batch_size), generator=gen)
        noise = torch.randn((BLOCK_STEPS, self.dim), generator=gen)
        return indices, noise

    def draw(self, chain: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices [m] int64, unit noise [d] float32) of ``chain`` at ``step``."""
        block, offset = divmod(step, BLOCK_STEPS)
        if self._cached != (chain, block):
            self._block = self._draw_block(chain, block)
            self._cached = (chain, block)
        indices, noise = self._block
        return indices[offset], noise[offset]

    def draw_steps(self, chain: int, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices [length, m] and noise [length, d] of ``chain`` at steps start .. start+length-1."""
        first, last = start // BLOCK_STEPS, (start + length - 1) // BLOCK_STEPS
        blocks = [self._draw_block(chain, k) for k in range(first, last + 1)]
        lo = start - first * BLOCK_STEPS
        indices = torch.cat([b[0] for b in blocks])[lo : lo + length]
        noise = torch.cat([b[1] for b in blocks])[lo : lo + length]
        return indices, noise


class InjectedRandomness:
    """Given indices [C, T, m] and unit noise [C, T, d]: step t of chain c reads row [c, t]."""

    def __init__(self, indices: torch.Tensor, noise: torch.Tensor):
        if indices.shape[:2] != noise.shape[:2]:
            raise FastLLCError("injected indices and noise must agree on (chains, steps)")
        self.indices, self.noise = indices.long(), noise.float()

    def check(self, chains: int, steps: int, n: int, batch_size: int, dim: int) -> None:
        if tuple(self.indices.shape) != (chains, steps, batch_size):
            raise FastLLCError(f"injected indices have shape {tuple(self.indices.shape)}, "
                               f"expected {(chains, steps, batch_size)}")
        if tuple(self.noise.shape) != (chains, steps, dim):
            raise FastLLCError(f"injected noise has shape {tuple(self.noise.shape)}, expected {(chains, steps, dim)}")
        if self.indices.numel() and not (0 <= int(self.indices.min()) and int(self.indices.max()) < n):
            raise FastLLCError(f"injected indices must lie in [0, {n})")

    def draw(self, chain: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.indices[chain, step], self.noise[chain, step]

    def draw_steps(self, chain: int, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.indices[chain, start : start + length], self.noise[chain, start : start + length]
