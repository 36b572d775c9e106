"""SGLD with localisation (Lau, Murfet, Wei 2023): fastllc's default sampler.

    w ← w − (ε/2)·[γ(w − w*) + nβ·∇L_m(w)] + √ε·ξ,   ξ ~ N(0, I)

Every backend and kernel names its per-chain coefficients alike, all positive, with the signs in the formula:
    decay = εγ/2,   drift = ε·nβ/2,   noise_scale = √ε
    Δ = −decay·(w − w*) − drift·∇L_m + noise_scale·ξ
(``coefficients``: the table the fused kernels, ``native`` and ``triton``, take.)

Batched, in place over the parameter-major buffer with G = −drift·∇L_m given (``gradient_factor``):
    G += noise_scale·ξ,   G −= (G·g)g if orthogonal,   W ← keep·W + G + decay·W*   (keep = 1 − decay)
Projecting G projects the whole increment Δ = −decay·(W − W*) + G, because W − W* stays orthogonal to g
(w_0 = w* and every increment is projected): no increment buffer, no extra passes over the weights.
"""

from __future__ import annotations

import math

import torch

from ..layout import axpy, project_out
from ._base import Sampler


class SGLD(Sampler):
    name = "sgld"
    title = "SGLD"

    def __eq__(self, other):
        return type(other) is SGLD

    def __hash__(self):
        return hash(self.name)

    def __repr__(self):
        return "SGLD()"

    @staticmethod
    def coefficients(epsilon: torch.Tensor, gamma: torch.Tensor, nbeta: torch.Tensor) -> torch.Tensor:
        """[C, 3] float64: (decay, drift, noise_scale) per chain."""
        return torch.stack([epsilon * gamma / 2, epsilon * nbeta / 2, epsilon.sqrt()], dim=1)

    def increment(self, state, w, w_star, grad, noise, epsilon, gamma, nbeta):
        return -(epsilon / 2) * (gamma * (w - w_star) + nbeta * grad) + math.sqrt(epsilon) * noise, state

    def gradient_factor(self, epsilon, nbeta):
        return -(epsilon * nbeta / 2)  # G = −drift·∇L_m: the sign folded in once, not negated every step

    def batched(self, layout, W, epsilon, gamma, nbeta):
        decay = layout.coefficient(epsilon * gamma / 2, W.device)
        keep, noise_scale = 1 - decay, layout.coefficient(epsilon.sqrt(), W.device)
        decay_w_star = W * decay  # W holds w* when the update is made

        def update(G, noise, projection=None):
            axpy(G, noise, noise_scale)
            if projection is not None:
                project_out(*projection)
            if isinstance(keep, float):
                torch.add(G, W, alpha=keep, out=W)
            else:
                torch.addcmul(G, W, keep, out=W)
            W.add_(decay_w_star)
        return update


SAMPLER = SGLD
