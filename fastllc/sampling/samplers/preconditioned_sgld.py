"""SGLD with a fixed diagonal preconditioner P > 0 given by the user (one value per weight, [d]):

    w ← w − (ε/2)·P·[γ(w − w*) + nβ·∇L_m(w)] + √ε·√P·ξ,   ξ ~ N(0, I)

This is RMSProp-SGLD's update with P frozen. A fixed P keeps the chain a discretisation of a Langevin
diffusion whose invariant measure is the localised posterior exp(−nβ·L_n − γ/2‖w − w*‖²) (Welling & Teh
2011 with a constant preconditioner), which RMSProp-SGLD's P_t, changing with the chain's own gradients,
does not. A P from a pilot run, or RMSProp's V at w* (``fastllc.curvature.rmsprop_preconditioner``), gives
the per-weight step sizes of RMSProp-SGLD without its adaptation. The orthogonal restriction projects the
whole increment. It needs its values, so it is given as an object:
``SGLDConfig(sampler=PreconditionedSGLD(P))``; ``P`` follows ``named_parameters`` order (the flat weights, or a
dict by parameter name).
"""

from __future__ import annotations

import hashlib
import math

import torch

from ...errors import FastLLCError
from ..layout import axpy, project_out
from ._base import Sampler


class PreconditionedSGLD(Sampler):
    name = "preconditioned_sgld"
    title = "SGLD with a fixed preconditioner"
    NAMEABLE = False
    state_buffers = 3  # P and √P in the layout, one scratch buffer

    def __init__(self, preconditioner):
        """``preconditioner``: P over the flat weights [d], or a dict of it per parameter name in
        ``named_parameters`` order (as ``fastllc.curvature.rmsprop_preconditioner`` returns it)."""
        if isinstance(preconditioner, dict):
            preconditioner = torch.cat([torch.as_tensor(v).detach().reshape(-1) for v in preconditioner.values()])
        self.preconditioner = torch.as_tensor(preconditioner, dtype=torch.float32).detach().reshape(-1).cpu()

    @classmethod
    def from_config(cls, config):
        raise FastLLCError("sampler 'preconditioned_sgld' needs its preconditioner: pass "
                           "SGLDConfig(sampler=PreconditionedSGLD(P)) with P > 0, one value per weight")

    @classmethod
    def example(cls, d: int) -> "PreconditionedSGLD":
        return cls(torch.linspace(0.5, 2.0, d))  # every weight its own step scale

    def check(self) -> None:
        P = self.preconditioner
        if P.numel() == 0 or not bool(torch.isfinite(P).all()) or not bool((P > 0).all()):
            raise FastLLCError("the preconditioner must be finite and > 0 everywhere, one value per weight")

    def settings(self) -> dict:
        P = self.preconditioner
        digest = hashlib.sha256(P.numpy().tobytes()).hexdigest()[:16]  # tells two preconditioners apart in records
        return {"size": P.numel(), "min": float(P.min()), "max": float(P.max()), "sha256": digest}

    def _values(self, d: int, device) -> torch.Tensor:
        if self.preconditioner.numel() != d:
            raise FastLLCError(f"the preconditioner has {self.preconditioner.numel()} values for a model with {d} "
                               "weights: give one per weight (named_parameters order)")
        return self.preconditioner.to(device)

    def increment(self, state, w, w_star, grad, noise, epsilon, gamma, nbeta):
        P = self._values(w.numel(), w.device)
        return -(epsilon / 2) * P * (gamma * (w - w_star) + nbeta * grad) + math.sqrt(epsilon) * (P.sqrt() * noise), state

    def batched(self, layout, W, epsilon, gamma, nbeta):
        device = W.device
        P = layout.to_parameter_major(self._values(layout.d, device).expand(layout.C, layout.d))
        root_P, scratch, W_star = P.sqrt(), torch.empty_like(W), W.clone()
        nb, gm = layout.coefficient(nbeta, device), layout.coefficient(gamma, device)
        minus_half_eps = layout.coefficient(-epsilon / 2, device)
        noise_scale = layout.coefficient(epsilon.sqrt(), device)

        def update(G, noise, projection=None):  # G holds ∇L_m; overwritten with Δ
            G.mul_(nb)
            axpy(G, torch.sub(W, W_star, out=scratch), gm)  # nβ·g + γ(W − W*)
            G.mul_(P).mul_(minus_half_eps)  # −(ε/2)·P·[...]
            axpy(G, torch.mul(root_P, noise, out=scratch), noise_scale)  # + √ε·√P·ξ
            if projection is not None:
                project_out(*projection)
            W.add_(G)
        return update


SAMPLER = PreconditionedSGLD
