"""Deterministic seeds derived from a user seed and a tuple of keys.

Every random stream in fastllc (a task's table, the split, initial weights, training batches, the
sampler's noise for chain c at step block k) gets its own seed from ``derive_seed(seed, *keys)``, so
streams never depend on each other or on how many of them run together.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch


def _as_int(key: int | str) -> int:
    if isinstance(key, str):
        return zlib.crc32(key.encode())
    if key < 0:
        raise ValueError(f"seed keys must be non-negative, got {key}")
    return int(key)


def derive_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed that depends only on (seed, *keys), well mixed by numpy's SeedSequence."""
    words = np.random.SeedSequence([_as_int(seed), *map(_as_int, keys)]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def generator(seed: int, *keys: int | str, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch.Generator seeded with ``derive_seed(seed, *keys)``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(seed, *keys))
    return gen
