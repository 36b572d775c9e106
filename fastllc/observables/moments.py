"""Running sums of the probe losses over the draws, one set per chain (float64, on the sampling device; the
chain mean's draws float32, as the losses the probes give and the raw file keeps).

At each draw d, chain c's probes give x_cd [N, K] (the element losses: K tokens of each of the N probe examples;
K = 1 for one loss per example), s_cd [N] (each example's loss: the weighted mean of its elements) and m_cd [O]
(each of the O probe sets' mean loss, weighted by elements). Kept, per chain, summed over its draws:

    count   [C]              draws
    x       [C, N, K]        Σ x                   means
    ss      [C, N, N]        Σ s sᵀ                sequence influences (compute_bif, method "sequence")
    m, mm   [C, O], [C, O, O]  Σ m, Σ m mᵀ         susceptibilities: any probe set may be the sampling task
    mx      [C, O, N, K]     Σ m ⊗ x               susceptibilities, per token
    xx      [C, NK, NK]      Σ vec(x) vec(x)ᵀ      token influences (method "token"; only with ``token_moments``)
    chain_draws [C, D, N, K] x_cd itself, every draw, float32 (influences with chains averaged; only with
                             ``chain_mean``)

Bytes (``bytes``): 8·C·(1 + NK·(1 + O) + N² + O + O²), plus 8·C·(NK)² with token moments, plus 4·C·D·NK with the
chain mean (C: every chain of every restriction; devinterp's ``bif`` with chains averaged: ``num_chains``).
Per-chain sums give every statistic without chain c for each c, hence jackknife standard errors over chains
(``jackknife_se``); the chain mean keeps each chain's draws (not only their sum over a group's chains) for the
same reason: the chain-averaged series without chain c, for each c, and only over the healthy chains.
Chains of one call are a contiguous range (the ``generic`` backend's groups); distinct ranges are added from
distinct threads without a lock (disjoint rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

FIELDS = ("count", "x", "ss", "m", "mm", "mx", "xx", "chain_draws")


def moments_bytes(chains: int, examples: int, elements: int, sets: int, *, token_moments: bool = False,
                  draws: int = 0) -> int:
    """Bytes of the running sums (module docstring); ``draws``: the draws each chain keeps (the chain mean's), or 0."""
    nk = examples * elements
    per_chain = 1 + nk * (1 + sets) + examples ** 2 + sets + sets ** 2 + (nk ** 2 if token_moments else 0)
    return 8 * chains * per_chain + 4 * chains * draws * nk


@dataclass
class Moments:
    """The sums (module docstring)."""

    count: torch.Tensor
    x: torch.Tensor
    ss: torch.Tensor
    m: torch.Tensor
    mm: torch.Tensor
    mx: torch.Tensor
    xx: torch.Tensor | None
    chain_draws: torch.Tensor | None

    @classmethod
    def zeros(cls, chains: int, examples: int, elements: int, sets: int, draws: int, *, token_moments: bool,
              chain_mean: bool, device) -> "Moments":
        z = lambda *shape, dtype=torch.float64: torch.zeros(shape, dtype=dtype, device=device)
        nk = examples * elements
        return cls(z(chains), z(chains, examples, elements), z(chains, examples, examples), z(chains, sets),
                   z(chains, sets, sets), z(chains, sets, examples, elements),
                   z(chains, nk, nk) if token_moments else None,
                   z(chains, draws, examples, elements, dtype=torch.float32) if chain_mean else None)

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tensors(self) -> dict:
        return {name: getattr(self, name) for name in FIELDS if getattr(self, name) is not None}

    def add(self, lo: int, hi: int, draw: int, x: torch.Tensor, s: torch.Tensor, m: torch.Tensor) -> None:
        """Chains lo..hi−1 at draw ``draw``: x [c, N, K], s [c, N], m [c, O] (float64; ``chain_draws`` keeps x as
        float32: a float32 model's losses exactly, a float64 model's rounded as the raw file rounds them)."""
        self.count[lo:hi] += 1
        self.x[lo:hi] += x
        self.ss[lo:hi].baddbmm_(s.unsqueeze(2), s.unsqueeze(1))
        self.m[lo:hi] += m
        self.mm[lo:hi].baddbmm_(m.unsqueeze(2), m.unsqueeze(1))
        self.mx[lo:hi] += m[:, :, None, None] * x[:, None]
        if self.xx is not None:
            flat = x.reshape(len(x), -1)
            self.xx[lo:hi].baddbmm_(flat.unsqueeze(2), flat.unsqueeze(1))
        if self.chain_draws is not None:
            self.chain_draws[lo:hi, draw] = x

    def cpu(self) -> "Moments":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return Moments(**{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in values.items()})

    def chains(self, index) -> dict:
        """Every per-chain sum restricted to the chains ``index`` (a bool mask or indices), each [c, ...]."""
        return {name: t[index] for name, t in self.tensors().items() if name != "chain_draws"}


def pooled(sums: dict) -> dict:
    """Per-chain sums (``Moments.chains``) summed over their chains: the sums of all their draws together."""
    return {name: t.sum(dim=0) for name, t in sums.items()}


def leave_one_out(sums: dict) -> dict:
    """Per-chain sums → the pooled sums of every chain but c, for each c (leading axis kept): the jackknife's."""
    return {name: t.sum(dim=0, keepdim=True) - t for name, t in sums.items()}


def jackknife_se(values: torch.Tensor) -> torch.Tensor:
    """The jackknife standard error over chains from an estimator's leave-one-chain-out values [c, ...]:
    √((c − 1)/c · Σ_c (θ₋c − mean θ₋)²). Chains are independent, so this is the error of the pooled estimator,
    its centring on the pooled mean and its non-linearity (correlations) included; NaN with one chain."""
    c = len(values)
    if c < 2:
        return torch.full(values.shape[1:], math.nan, dtype=torch.float64)
    return ((c - 1) / c * (values - values.mean(dim=0)).pow(2).sum(dim=0)).sqrt()


__all__ = ["Moments", "jackknife_se", "leave_one_out", "moments_bytes", "pooled"]
