"""Where each chain's minibatches and Gaussian noise come from.

``CounterRandomness`` is counter-based: minibatch index i and noise element k of chain c at step t are
pure functions of (seed, c, t, i or k), so chain 3 follows the same trajectory whether 4 or 1024
chains run beside it, in whatever order or blocking a backend uses. Random words are SplitMix64 outputs
(Steele, Lea, Flood 2014) keyed by (seed, stream, c, t); Gaussians come from them by Doornik's (2005)
ziggurat (256 layers), which needs no logarithm or sine on 98.6% of draws, so one core fills ~2× faster
than ``torch.randn`` (Numba). The fills release the GIL: a backend runs groups of chains in threads.
Indices use Lemire's multiply-shift (bias < n/2³²).

``InjectedRandomness`` takes indices and noise as tensors, so that two backends can be made to follow the
same trajectory and be compared parameter by parameter.

Both give *unit* noise; a sampler scales it by √ε of the chain.
"""

from __future__ import annotations

import math
import os
import threading

import numpy as np
import torch
from numba import njit

from ..errors import FastLLCError
from ..ziggurat import _DENSITY, _EDGES, _EDGES32, _RATIOS, _TAIL, ziggurat_tables  # noqa: F401

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_NOISE_STREAM, _INDEX_STREAM = 1, 2
_WORDS_PER_ELEMENT_SHIFT = np.uint64(20)  # element k owns words k·2²⁰ .. k·2²⁰+2²⁰−1 of its step's stream


@njit(inline="always")
def _mix64(z):
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@njit(inline="always")
def _stream_key(seed, stream, chain, step):
    key = _mix64(np.uint64(seed) + _GOLDEN * np.uint64(stream))
    key = _mix64(key + _GOLDEN * np.uint64(chain + 1))
    return _mix64(key + _GOLDEN * np.uint64(step + 1))


@njit(inline="always")
def _word(key, element, j):
    """Word j of noise element ``element``'s own sequence."""
    return _mix64(key + _GOLDEN * ((np.uint64(element) << _WORDS_PER_ELEMENT_SHIFT) + np.uint64(j)))


@njit(inline="always")
def _signed_unit(word):
    """A float32 in [-1, 1) from the top 24 bits of a word (the low 8 bits pick the layer: independent)."""
    return np.float32(np.int64(word >> np.uint64(40))) * np.float32(1.0 / 8388608.0) - np.float32(1.0)


@njit(inline="always")
def _uniform(word):
    """A double in (0, 1] from the top 53 bits of a word."""
    return ((word >> np.uint64(11)) + np.uint64(1)) * (1.0 / 9007199254740992.0)


@njit
def _normal_slow(key, element, edges, ratios, density, tail):
    """The full ziggurat for one element, from its first word; reached for ~1.4% of elements."""
    j = 0
    while True:
        word = _word(key, element, j)
        j += 1
        layer = np.int64(word & np.uint64(255))
        u = _signed_unit(word)
        if abs(u) < ratios[layer]:
            return u * np.float32(edges[layer])
        if layer == 0:  # the tail beyond x_1, by Marsaglia's exponential method
            while True:
                x = math.log(_uniform(_word(key, element, j))) / tail
                y = math.log(_uniform(_word(key, element, j + 1)))
                j += 2
                if -2.0 * y >= x * x:
                    return x - tail if u < 0 else tail - x
        x = u * edges[layer]  # the wedge between the rectangle and the density: accept under the curve
        v = _uniform(_word(key, element, j))
        j += 1
        if density[layer + 1] + v * (density[layer] - density[layer + 1]) < math.exp(-0.5 * x * x):
            return x


@njit(nogil=True, cache=True)
def _fill_noise(seed, chains, step, edges, edges32, ratios, density, tail, blocks, out):
    """Unit noise of ``chains`` at ``step`` into the flat ``out`` [C·d]: element k (canonical order) of row r,
    in block j = [blocks[j], blocks[j+1]), goes to out[C·blocks[j] + r·size_j + k − blocks[j]]. One block
    [0, d] is the chain-major layout [C, d]; one block per parameter is the parameter-major layout."""
    C = chains.shape[0]
    for row in range(C):
        key = _stream_key(seed, _NOISE_STREAM, chains[row], step)
        for j in range(blocks.shape[0] - 1):
            lo, hi = blocks[j], blocks[j + 1]
            values = out[C * lo + row * (hi - lo) : C * lo + (row + 1) * (hi - lo)]
            rejected = np.empty(hi - lo, np.bool_)
            # fast path for every element, branch-free so that it vectorises: the point in its layer's rectangle
            for i in range(hi - lo):
                word = _word(key, lo + i, 0)
                layer = np.int64(word & np.uint64(255))
                u = _signed_unit(word)
                values[i] = u * edges32[layer]
                rejected[i] = abs(u) >= ratios[layer]
            for i in range(hi - lo):  # the other ~1.4%: the full algorithm
                if rejected[i]:
                    values[i] = _normal_slow(key, lo + i, edges, ratios, density, tail)


@njit(nogil=True, cache=True)
def _fill_indices(seed, chains, step, n, out):
    for row in range(out.shape[0]):
        key = _stream_key(seed, _INDEX_STREAM, chains[row], step)
        for i in range(out.shape[1]):
            word = _mix64(key + _GOLDEN * np.uint64(i))
            out[row, i] = np.int64(((word >> np.uint64(32)) * np.uint64(n)) >> np.uint64(32))


# The noise is filled by the native kernel's vectorised ziggurat (``fastllc_draw_noise`` in
# kernels/mlp_sgld_cpu.cpp: the same values, bit for bit) where it builds, from this many floats a step: the
# language models' 100k-weight chains spent ~10% of a step in the Python fill (150M normals/s on one Zen 4 thread).
NATIVE_MIN = 1 << 14
NATIVE_ENV = "FASTLLC_NATIVE_NOISE"  # "0": always the Numba fill (comparisons, or a machine without a compiler)


_NATIVE_LOCK = threading.Lock()


def _native_can_fill(flat: np.ndarray, chains: int, blocks: np.ndarray) -> bool:
    """Whether the native fill may write ``flat``: large enough to pay, float32, one contiguous buffer that holds
    every block of every chain (else the Numba fill, which checks its own bounds, writes it)."""
    return (flat.size >= NATIVE_MIN and flat.dtype == np.float32 and flat.flags.c_contiguous
            and chains * int(blocks[-1]) <= flat.size)


_TABLES = tuple(a.ctypes.data for a in (_EDGES, _EDGES32, _RATIOS, _DENSITY))  # module-level arrays: fixed addresses
_UNRESOLVED = object()
_native = _UNRESOLVED


def _native_fill():
    """The native kernel's ``fastllc_draw_noise``, or None where it cannot be built (the Numba fill is used). Resolved
    once per process (``FASTLLC_NATIVE_NOISE`` is read then), under a lock taken only until then: the chain groups'
    threads all ask at their first step, and the kernel's first build (timed to choose its variant) runs once, alone."""
    global _native
    if _native is _UNRESOLVED:
        with _NATIVE_LOCK:
            if _native is _UNRESOLVED:
                _native = _resolve_native_fill()
    return _native


def _resolve_native_fill():
    if os.environ.get(NATIVE_ENV) == "0":
        return None
    from .. import native_build
    try:
        return native_build.load().fastllc_draw_noise
    except native_build.NativeUnavailable:
        return None


def _single_block(dim: int) -> np.ndarray:
    return np.array([0, dim], np.int64)


class CounterRandomness:
    """Counter-based indices and unit noise for any set of chains at any step (see the module docstring)."""

    def __init__(self, seed: int, n: int, batch_size: int, dim: int):
        if not 1 <= n < 2**32:
            raise FastLLCError(f"the number of examples must be in [1, 2^32), got {n}")
        self.seed, self.n, self.batch_size, self.dim = seed, n, batch_size, dim

    def fill(self, chains: np.ndarray, step: int, indices: np.ndarray, noise: np.ndarray,
             blocks: np.ndarray | None = None) -> None:
        """Write indices [len(chains), m] int64 and unit noise float32 of ``step`` in place.

        ``noise`` is [len(chains), d], or flat in the blocked layout of ``blocks`` (see ``_fill_noise``).
        """
        _fill_indices(self.seed, chains, step, self.n, indices)
        blocks = _single_block(self.dim) if blocks is None else blocks
        flat = noise.reshape(-1)
        native = _native_fill() if _native_can_fill(flat, len(chains), blocks) else None
        if native is None:
            _fill_noise(self.seed, chains, step, _EDGES, _EDGES32, _RATIOS, _DENSITY, _TAIL, blocks, flat)
            return
        chains, blocks = (np.ascontiguousarray(a, np.int64) for a in (chains, blocks))
        native(len(chains), chains.ctypes.data, self.seed, step, *_TABLES, _TAIL, blocks.ctypes.data,
               len(blocks) - 1, flat.ctypes.data)

    def draw(self, chain: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices [m] int64, unit noise [d] float32) of one chain at one step."""
        indices = np.empty((1, self.batch_size), np.int64)
        noise = np.empty((1, self.dim), np.float32)
        self.fill(np.array([chain], np.int64), step, indices, noise)
        return torch.from_numpy(indices[0]), torch.from_numpy(noise[0])


class InjectedRandomness:
    """Given indices [C, T, m] and unit noise [C, T, d]: step t of chain c reads row [c, t]."""

    @classmethod
    def seeded(cls, chains: int, steps: int, n: int, batch_size: int, dim: int, seed: int = 0) -> "InjectedRandomness":
        """Uniform indices and standard normal noise from a torch generator seeded with ``seed``: what tests
        and benchmarks feed two backends to compare them parameter by parameter."""
        gen = torch.Generator().manual_seed(seed)
        return cls(torch.randint(n, (chains, steps, batch_size), generator=gen),
                   torch.randn(chains, steps, dim, generator=gen))

    def __init__(self, indices: torch.Tensor, noise: torch.Tensor):
        if indices.shape[:2] != noise.shape[:2]:
            raise FastLLCError("injected indices and noise must agree on (chains, steps)")
        self.indices, self.noise = indices.long().cpu(), noise.float().cpu()

    def check(self, chains: int, steps: int, n: int, batch_size: int, dim: int) -> None:
        if tuple(self.indices.shape) != (chains, steps, batch_size):
            raise FastLLCError(f"injected indices have shape {tuple(self.indices.shape)}, "
                               f"expected {(chains, steps, batch_size)}")
        if tuple(self.noise.shape) != (chains, steps, dim):
            raise FastLLCError(f"injected noise has shape {tuple(self.noise.shape)}, expected {(chains, steps, dim)}")
        if self.indices.numel() and not (0 <= int(self.indices.min()) and int(self.indices.max()) < n):
            raise FastLLCError(f"injected indices must lie in [0, {n})")

    def fill(self, chains: np.ndarray, step: int, indices: np.ndarray, noise: np.ndarray,
             blocks: np.ndarray | None = None) -> None:
        indices[:] = self.indices[chains, step].numpy()
        rows = self.noise[chains, step].numpy()
        blocks = _single_block(rows.shape[1]) if blocks is None else blocks
        flat, C = noise.reshape(-1), len(chains)
        for lo, hi in zip(blocks[:-1], blocks[1:]):
            flat[C * lo : C * hi].reshape(C, hi - lo)[:] = rows[:, lo:hi]

    def draw(self, chain: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.indices[chain, step], self.noise[chain, step]


def for_run(randomness, config, n: int, dim: int, chains: int | None = None):
    """The randomness a CPU-drawing backend uses for ``config``'s run on n examples and ``dim`` weights:
    ``CounterRandomness`` keyed by ``config.seed`` when none is given, an ``InjectedRandomness`` checked
    against the run's shape (``chains``: all chains of the batch, default ``config.chains``), any other
    generator as given."""
    if randomness is None:
        return CounterRandomness(config.seed, n, config.batch_size, dim)
    if isinstance(randomness, InjectedRandomness):
        randomness.check(config.chains if chains is None else chains, config.steps, n, config.batch_size, dim)
    return randomness
