"""Fourier modes of a modular-addition embedding (Numba hot loops, a numpy FFT path to check them).

For the embedding W (p×e) and each frequency k = 1 … (p−1)/2, with the orthonormal basis vectors
c_k[j] = √(2/p)·cos(2πjk/p) and s_k[j] = √(2/p)·sin(2πjk/p) of Z_p:
    magnitude_k   = √(‖c_kᵀW‖² + ‖s_kᵀW‖²)
    roundness_k   = σ_min/σ_max of [Wᵀc_k, Wᵀs_k] (e×2)  ∈ [0, 1]
    plane_k       = span{Wᵀc_k, Wᵀs_k} ⊂ R^e, and every token's 2-D coordinates z_j in it
    circularity_k = max_± |Σ_j z_j·e^{∓2πijk/p}|² / (p·Σ_j |z_j|²)  ∈ [0, 1]
Roundness is the shape of the frequency-k component alone: 1 when the tokens' k-components form a
circle (cos and sin carried by orthogonal directions of equal length), 0 when they collapse onto a line
(only one phase is carried). Circularity is what a picture of the plane shows: the share of the plane's
energy in one rotating mode, 1 exactly when the tokens' full embeddings lie on a circle centred at the
origin, visited in the order j·k mod p (either way round); ellipses and leakage from other frequencies
that share the plane lower it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit


def frequencies(p: int) -> np.ndarray:
    """k = 1 … ⌊(p−1)/2⌋: the frequencies with a cos/sin pair (p even also has k = p/2, cos only: left out)."""
    return np.arange(1, (p - 1) // 2 + 1)


@njit(cache=True)
def _fourier_projections(W):
    """cos and sin projections c_kᵀW, s_kᵀW for k = 1 … (p−1)/2: two [K, e] arrays."""
    p, e = W.shape
    K = (p - 1) // 2
    scale = math.sqrt(2.0 / p)
    cos_part = np.zeros((K, e))
    sin_part = np.zeros((K, e))
    for k in range(1, K + 1):
        for j in range(p):
            angle = 2.0 * math.pi * ((j * k) % p) / p
            c, s = scale * math.cos(angle), scale * math.sin(angle)
            for d in range(e):
                cos_part[k - 1, d] += c * W[j, d]
                sin_part[k - 1, d] += s * W[j, d]
    return cos_part, sin_part


@njit(cache=True)
def _circularity(z_re, z_im, k):
    """Share of the energy of points z_j (j = 0 … p−1) in one rotating mode of frequency k."""
    p = z_re.shape[0]
    forward_re = forward_im = backward_re = backward_im = energy = 0.0
    for j in range(p):
        angle = 2.0 * math.pi * ((j * k) % p) / p
        c, s = math.cos(angle), math.sin(angle)
        forward_re += z_re[j] * c + z_im[j] * s  # z·e^{−iθ}
        forward_im += z_im[j] * c - z_re[j] * s
        backward_re += z_re[j] * c - z_im[j] * s  # z·e^{+iθ}
        backward_im += z_im[j] * c + z_re[j] * s
        energy += z_re[j] ** 2 + z_im[j] ** 2
    if energy == 0.0:
        return 0.0
    best = max(forward_re**2 + forward_im**2, backward_re**2 + backward_im**2)
    return best / (p * energy)


@dataclass
class FourierModes:
    """Per-frequency summary of an embedding W (p×e); arrays are indexed by k − 1."""

    p: int
    frequencies: np.ndarray  # [K] k = 1 … (p−1)/2
    magnitudes: np.ndarray  # [K]
    roundness: np.ndarray  # [K]
    circularity: np.ndarray  # [K]
    coordinates: np.ndarray  # [K, p, 2] every token in each frequency's plane
    pairs: np.ndarray | None = None  # [K, e, 2] (Wᵀc_k, Wᵀs_k): the plane's spanning pair, in embedding space

    def magnitude(self, k: int) -> float:
        return float(self.magnitudes[k - 1])


def plane_coordinates(W: np.ndarray, cos_part: np.ndarray, sin_part: np.ndarray) -> np.ndarray:
    """[K, p, 2]: each token's embedding projected onto an orthonormal basis of span{Wᵀc_k, Wᵀs_k}."""
    K = cos_part.shape[0]
    coords = np.zeros((K, W.shape[0], 2))
    for index in range(K):
        spanning = np.stack([cos_part[index], sin_part[index]], axis=1)  # [e, 2]
        basis, _ = np.linalg.qr(spanning)
        coords[index] = W @ basis
    return coords


def fourier_modes(W, use_numba: bool = True) -> FourierModes:
    """Magnitudes, plane coordinates and circularity of every frequency of the embedding ``W`` [p, e]."""
    W = np.asarray(W, dtype=np.float64)
    p = W.shape[0]
    if p < 3:
        raise ValueError(f"Fourier circuits need p >= 3 (a frequency with a cos/sin pair), got p = {p}")
    if use_numba:
        cos_part, sin_part = _fourier_projections(W)
    else:  # numpy's FFT: Σ_j W_j e^{−2πijk/p} = √(p/2)·(c_kᵀW − i·s_kᵀW)
        spectrum = np.fft.fft(W, axis=0)[1 : (p - 1) // 2 + 1] * math.sqrt(2.0 / p)
        cos_part, sin_part = spectrum.real, -spectrum.imag
    magnitudes = np.sqrt((cos_part**2).sum(axis=1) + (sin_part**2).sum(axis=1))
    singular = np.linalg.svd(np.stack([cos_part, sin_part], axis=2), compute_uv=False)  # [K, 2]
    roundness = np.divide(singular[:, 1], singular[:, 0], out=np.zeros(len(singular)), where=singular[:, 0] > 0)
    coords = plane_coordinates(W, cos_part, sin_part)
    ks = frequencies(p)
    if use_numba:
        circ = np.array([_circularity(coords[i, :, 0].copy(), coords[i, :, 1].copy(), k) for i, k in enumerate(ks)])
    else:
        circ = np.array([_circularity_numpy(coords[i], k) for i, k in enumerate(ks)])
    return FourierModes(p, ks, magnitudes, roundness, circ, coords, np.stack([cos_part, sin_part], axis=2))


def _circularity_numpy(coords: np.ndarray, k: int) -> float:
    p = coords.shape[0]
    z = coords[:, 0] + 1j * coords[:, 1]
    phase = np.exp(-2j * np.pi * (np.arange(p) * k % p) / p)
    energy = (np.abs(z) ** 2).sum()
    if energy == 0:
        return 0.0
    return float(max(abs((z * phase).sum()) ** 2, abs((z * phase.conj()).sum()) ** 2) / (p * energy))


def keep_frequencies(W: np.ndarray, ks) -> np.ndarray:
    """W with only its DFT components 0, k and p−k for k in ``ks`` kept (constant, c_k and s_k directions)."""
    W = np.asarray(W, dtype=np.float64)
    p = W.shape[0]
    j = np.arange(p)
    rows = [np.full(p, 1 / math.sqrt(p))]
    for k in ks:
        rows += [math.sqrt(2 / p) * np.cos(2 * np.pi * j * k / p), math.sqrt(2 / p) * np.sin(2 * np.pi * j * k / p)]
    basis = np.stack(rows)  # orthonormal rows for distinct k in 1 … (p−1)/2
    return basis.T @ (basis @ W)
