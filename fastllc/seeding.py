"""Deterministic seeds derived from a user seed and a tuple of keys.

Every random stream in fastllc (a task's table, the split, initial weights, training batches, the
sampler's noise for chain c at step block k) gets its own seed from ``derive_seed(seed, *keys)``, so
streams never depend on each other or on how many of them run together.
"""

from __future__ import annotations

import numbers
import zlib

import numpy as np
import torch

from .errors import FastLLCError

MAX_SEED = 2**63 - 1
"""The largest seed every generator takes: the samplers' counter-based streams key on a signed 64-bit
integer (Numba's int64 in ``sampling/randomness.py``, the Triton kernel's i64 scalar); numpy's SeedSequence
and torch's ``manual_seed`` take at least as much."""


def check_seed(seed, name: str = "seed") -> int:
    """``seed`` as an int, or a FastLLCError naming ``name`` when it is not an integer in [0, MAX_SEED]."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= MAX_SEED:
        raise FastLLCError(f"{name} must be an integer in [0, 2**63 − 1], got {seed!r}")
    return int(seed)


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
