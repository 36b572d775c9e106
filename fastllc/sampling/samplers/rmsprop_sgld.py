"""RMSProp-SGLD: RMSProp-preconditioned SGLD (Li et al. 2016; the sampler Hitchcock & Hoogland 2025 recommend),
exactly as devinterp 1.3.2 runs it (``devinterp/optim/sgmcmc.py``, ``SGMCMC.rmsprop_sgld`` and ``SGMCMC.step``;
``devinterp/optim/preconditioner.py``, ``RMSpropPreconditioner.get_coefficients``), with α (devinterp's
``alpha``, 0.99) and the stabiliser δ (devinterp's ``eps``, 0.1). Per chain, elementwise, with V_0 = 0:
    g_t = ∇L_m(w_t)                                  (the minibatch loss only: not nβ, not the γ term)
    V_t = α·V_{t−1} + (1 − α)·g_t²                    (updated before use: V_1 = (1 − α)·g_1²)
    P_t = 1 / (√V_t + δ)                              (δ outside the square root; no bias correction)
    w ← w − (ε/2)·P_t·[γ(w − w*) + nβ·g_t] + √ε·√P_t·ξ,   ξ ~ N(0, I)
so the preconditioner scales the gradient and the localisation term alike, and the noise by √P_t (its
covariance is ε·P_t). The orthogonal restriction projects this whole increment: W − W* no longer stays
orthogonal to g, so the batched update builds all of Δ in G before projecting.

Named ``"rmsprop_sgld"`` it takes α and δ from ``SGLDConfig.rmsprop_alpha`` and ``rmsprop_eps``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...errors import FastLLCError
from ..layout import axpy, project_out
from ._base import Sampler


@dataclass(frozen=True)
class RMSPropSGLD(Sampler):
    alpha: float = 0.99  # decay of the mean squared gradient V (devinterp's alpha)
    delta: float = 0.1  # δ in P = 1/(√V + δ) (devinterp's eps)

    name = "rmsprop_sgld"
    title = "RMSProp-preconditioned SGLD"
    state_buffers = 3  # V, P and one scratch buffer

    @classmethod
    def from_config(cls, config) -> "RMSPropSGLD":
        return cls(config.rmsprop_alpha, config.rmsprop_eps)

    @classmethod
    def example(cls, d: int) -> "RMSPropSGLD":
        return cls(alpha=0.9, delta=0.05)

    def check(self) -> None:
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and 0 < self.alpha < 1):
            raise FastLLCError(f"rmsprop_alpha must be in (0, 1), got {self.alpha}")
        if not (isinstance(self.delta, (int, float)) and math.isfinite(self.delta) and self.delta > 0):
            raise FastLLCError(f"rmsprop_eps must be finite and > 0, got {self.delta}")

    def settings(self) -> dict:
        return {"alpha": float(self.alpha), "eps": float(self.delta)}

    def start(self, w_star):
        return torch.zeros_like(w_star)  # V_0 = 0

    def increment(self, state, w, w_star, grad, noise, epsilon, gamma, nbeta):
        V = self.alpha * state + (1 - self.alpha) * grad * grad  # devinterp 1.3.2's order of operations
        P = 1 / (V.sqrt() + self.delta)
        delta = -(epsilon / 2) * (P * (nbeta * grad) + P * (gamma * (w - w_star))) + math.sqrt(epsilon) * (P.sqrt() * noise)
        return delta, V

    def batched(self, layout, W, epsilon, gamma, nbeta):
        device = W.device
        V, P, scratch, W_star = torch.zeros_like(W), torch.empty_like(W), torch.empty_like(W), W.clone()
        nb, gm = layout.coefficient(nbeta, device), layout.coefficient(gamma, device)
        minus_half_eps = layout.coefficient(-epsilon / 2, device)
        noise_scale = layout.coefficient(epsilon.sqrt(), device)
        alpha, delta = float(self.alpha), float(self.delta)

        def update(G, noise, projection=None):  # G holds ∇L_m; overwritten with Δ
            V.mul_(alpha).addcmul_(G, G, value=1 - alpha)  # V ← αV + (1 − α)g²
            torch.sqrt(V, out=P).add_(delta).reciprocal_()  # P = 1/(√V + δ)
            G.mul_(nb)
            axpy(G, torch.sub(W, W_star, out=scratch), gm)  # nβ·g + γ(W − W*)
            G.mul_(P).mul_(minus_half_eps)  # −(ε/2)·P·[...]
            axpy(G, torch.mul(P.sqrt_(), noise, out=scratch), noise_scale)  # + √ε·√P·ξ
            if projection is not None:
                project_out(*projection)
            W.add_(G)
        return update


SAMPLER = RMSPropSGLD
