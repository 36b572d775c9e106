"""What a sampler provides. One chain's update, written for the reference (``increment``), and the same
update for C chains at once over the parameter-major layout (``batched``), which the batched backends run.

Every sampler moves a chain from w* by w ← w + Δ, Δ a function of w, w*, the minibatch gradient ∇L_m(w),
unit noise ξ and the chain's (ε, γ, nβ). The backends then project Δ orthogonally to ∇L_n(w*) (``orthogonal``)
and hold the unselected weights at w* (``restrict``): those are not the sampler's business.
"""

from __future__ import annotations

import torch


class Sampler:
    """Subclasses set ``name`` and implement the methods below (see ``sgld.py`` for the simplest)."""

    name = ""  # what SGLDConfig.sampler, capabilities, records and job names call it
    title = ""  # what messages call it
    NAMEABLE = True  # a name alone selects it (``from_config``); False when it needs values only an object holds
    state_buffers = 0  # parameter-sized float32 buffers per chain its batched update keeps (memory plans)

    @classmethod
    def from_config(cls, config) -> "Sampler":
        """The sampler with ``config``'s settings (SGLDConfig's fields)."""
        return cls()

    @classmethod
    def example(cls, d: int) -> "Sampler":
        """An instance for a model with d weights, settings off their defaults where it has any: what the
        tests and the conformance checks run every sampler with."""
        return cls()

    def check(self) -> None:
        """Raise a one-line FastLLCError on a bad setting."""

    def settings(self) -> dict:
        """Its settings as JSON values, for records (empty: the name says everything)."""
        return {}

    # one chain, flat [d] vectors: the reference backend
    def start(self, w_star: torch.Tensor):
        """The chain's state before its first step (None: stateless)."""
        return None

    def increment(self, state, w, w_star, grad, noise, epsilon: float, gamma: float, nbeta: float):
        """(Δ [d], the new state) of one step from w, given ∇L_m(w) and unit noise ξ."""
        raise NotImplementedError

    # C chains in one parameter-major buffer: the torch and generic backends
    def gradient_factor(self, epsilon: torch.Tensor, nbeta: torch.Tensor) -> torch.Tensor:
        """[C] float64: the factor by which ∇L_m must arrive in G for ``batched``'s update (a backend may fold it
        into its backward pass: the torch engine does)."""
        return torch.ones_like(epsilon)

    def batched(self, layout, W: torch.Tensor, epsilon, gamma, nbeta):
        """``update(G, noise, projection)``: one step of every chain, in place on W (parameter-major, starting
        at w*), from G = gradient_factor·∇L_m (overwritten), unit noise ξ and, under the orthogonal restriction,
        ``projection`` = (G's per-parameter rows, the unit directions' rows) for ``layout.project_out``."""
        raise NotImplementedError
