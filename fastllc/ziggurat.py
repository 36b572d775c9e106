"""The tables of the normal sampler's 256-layer ziggurat (Marsaglia & Tsang 2000), shared by the Numba fill
(``sampling/randomness.py``) and the native kernel (``kernels/mlp_sgld_cpu.cpp``, which ``native_build`` times with them):
a module of its own so that neither imports the other for them."""

from __future__ import annotations

import math

import numpy as np


def _ziggurat_tables(layers: int = 256, tail: float = 3.6541528853610088, area: float = 0.00492867323399):
    """Layer edges x_0 > x_1 = tail > ... > x_layers = 0 of the normal density's 256-layer ziggurat
    (Marsaglia & Tsang 2000 constants), x_{i+1}/x_i, and the density exp(−x_i²/2) at each edge."""
    def density(x):
        return math.exp(-0.5 * x * x)
    edges = np.zeros(layers + 1)
    edges[0], edges[1] = area / density(tail), tail
    for i in range(2, layers):
        edges[i] = math.sqrt(-2.0 * math.log(area / edges[i - 1] + density(edges[i - 1])))
    return edges, (edges[1:] / edges[:-1]).astype(np.float32), np.exp(-0.5 * edges**2)


_EDGES, _RATIOS, _DENSITY = _ziggurat_tables()
_EDGES32 = _EDGES.astype(np.float32)
_TAIL = float(_EDGES[1])


def ziggurat_tables() -> dict:
    """The normal sampler's tables, as the native kernel takes them (``native_build.RUN_PARAMETERS``): the kernel
    draws the same noise as ``CounterRandomness`` from them."""
    return dict(edges=_EDGES, edges32=_EDGES32, ratios=_RATIOS, density=_DENSITY, tail=_TAIL)
