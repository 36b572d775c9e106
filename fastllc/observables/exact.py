"""Exact susceptibilities and influences of a linear-Gaussian model: what the estimators must reproduce.

The model is linear regression ŷ = wᵀx with the ½-squared-error loss, its data built so that w* minimises L_n
exactly (the noise has no component along the inputs' columns), so L_n(w) = L_n(w*) + ½·δᵀHδ with δ = w − w* and
H = XᵀX/n. The localised tempered posterior restricted to the coordinates R (the others held at w*) is then
Gaussian: δ_R ~ N(0, Σ_R), Σ_R = (nβ·H_RR + γ·I)⁻¹ (``posterior_covariance``).

A probe example (x_i, y_i) with residual r_i = y_i − x_iᵀw* has loss ℓ_i = ½(r_i − x_iᵀδ)², so with K = X_p Σ X_pᵀ
    E[ℓ_i] = ½ r_i² + ½ K_ii,      Cov(ℓ_i, ℓ_j) = r_i r_j K_ij + ½ K_ij²
(Isserlis: odd moments of δ vanish, Cov(a², b²) = 2 Cov(a, b)² for jointly Gaussian a, b): ``loss_moments``. The
sequence influence is Corr(ℓ_i, ℓ_j); the susceptibility of restriction R to probe example j with task set T
(m = mean_{i∈T} ℓ_i) is χ_j = −Cov_R(m, ℓ_j − m) for the covariance estimator, and for devinterp's estimator its
expectation Cov_R(m, m − ℓ_j) + (E_R[m] − L0)·(E_R[m − ℓ_j] − E_full[m − ℓ_j]) (``susceptibilities.py``).

SGLD with step ε samples a slightly different law. ``sgld_covariance`` gives the exact stationary covariance of
the chain actually run (its minibatches of m examples drawn with replacement included): the recursion
Σ = E[M_B Σ M_Bᵀ] + ε·I + c²·Cov(g_B), M_B = I − (ε/2)(γI + nβ·H_B), c = ε·nβ/2, g_B the minibatch mean of x·r,
solved as a linear system in vec(Σ). Its fourth moments are Gaussian only up to the minibatch noise's
(relative O(c²/m)); the difference between its answers and the posterior's is the sampler's bias, which a check
must keep well below the standard errors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class LinearGaussian:
    """A linear model at its exact least-squares minimum w*, its training data and named probe sets."""

    model: nn.Linear
    data: tuple  # (X [n, d], y [n, 1]) float32
    probes: dict  # {name: (X [N_o, d], y [N_o, 1])} float32
    w_star: torch.Tensor  # [d] float64

    def hessian(self) -> torch.Tensor:
        x = self.data[0].double()
        return x.T @ x / len(x)

    def residuals(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (y.double().reshape(-1) - x.double() @ self.w_star)

    def init_loss(self) -> float:
        return float(0.5 * self.residuals(*self.data).pow(2).mean())


def linear_gaussian(d: int, n: int, probe_sizes: dict, seed: int = 0, correlation: float = 0.5,
                    probe_noise: dict | None = None) -> LinearGaussian:
    """Inputs with pairwise correlation ``correlation`` (H not isotropic, so restricted posteriors differ from
    the marginals), unit noise orthogonal to them; probes drawn alike, with residual scale ``probe_noise[name]``."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.linalg.cholesky((1 - correlation) * torch.eye(d, dtype=torch.float64)
                                + correlation * torch.ones(d, d, dtype=torch.float64))
    w_star = torch.randn(d, generator=g, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ mix.T
    noise = torch.randn(n, generator=g, dtype=torch.float64)
    noise -= x @ torch.linalg.solve(x.T @ x, x.T @ noise)
    y = x @ w_star + noise
    probes = {}
    for name, size in probe_sizes.items():
        xp = torch.randn(size, d, generator=g, dtype=torch.float64) @ mix.T
        scale = (probe_noise or {}).get(name, 1.0)
        probes[name] = (xp.float(), (xp @ w_star + scale * torch.randn(size, generator=g, dtype=torch.float64))
                        .float().unsqueeze(1))
    x32, y32 = x.float(), y.float().unsqueeze(1)
    w32 = w_star.float()
    model = nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(w32.unsqueeze(0))
    # w* in float32 is what the chains start from: the residuals use it, so the exact answers are about that point
    return LinearGaussian(model, (x32, y32), probes, w32.double())


def posterior_covariance(hessian: torch.Tensor, nbeta: float, gamma: float, subset: torch.Tensor) -> torch.Tensor:
    """Σ [d, d] of the localised posterior restricted to the coordinates ``subset`` (bool [d]); 0 elsewhere."""
    d = len(hessian)
    out = torch.zeros(d, d, dtype=torch.float64)
    index = subset.nonzero().flatten()
    block = nbeta * hessian[index][:, index] + gamma * torch.eye(len(index), dtype=torch.float64)
    out[index.unsqueeze(1), index] = torch.linalg.inv(block)
    return out


def sgld_covariance(x: torch.Tensor, residuals: torch.Tensor, nbeta: float, gamma: float, epsilon: float,
                    batch: int, subset: torch.Tensor) -> torch.Tensor:
    """The stationary covariance of the SGLD chain itself (module docstring), restricted to ``subset``."""
    index = subset.nonzero().flatten()
    xs, r = x.double()[:, index], residuals.double()
    p = len(index)
    h = xs.T @ xs / len(xs)
    eye = torch.eye(p, dtype=torch.float64)
    mean_m = eye - 0.5 * epsilon * (gamma * eye + nbeta * h)
    c = 0.5 * epsilon * nbeta
    outer = torch.einsum("ni,nj->nij", xs, xs)  # x xᵀ per example
    # E[(H_B − H) Σ (H_B − H)] = (E[x xᵀ Σ x xᵀ] − H Σ H)/m, linear in Σ: as a [p², p²] operator
    quad = torch.einsum("nij,nkl->ikjl", outer, outer).reshape(p * p, p * p) / len(xs)
    operator = torch.kron(mean_m, mean_m) + (c * c / batch) * (quad - torch.kron(h, h))
    noise = epsilon * eye + (c * c / batch) * (xs * r.unsqueeze(1) ** 2).T @ xs / len(xs)
    sigma = torch.linalg.solve(torch.eye(p * p, dtype=torch.float64) - operator, noise.reshape(-1)).reshape(p, p)
    out = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
    out[index.unsqueeze(1), index] = 0.5 * (sigma + sigma.T)
    return out


def loss_moments(x: torch.Tensor, residuals: torch.Tensor, sigma: torch.Tensor) -> tuple:
    """(E[ℓ] [N], Cov(ℓ) [N, N]) of the probe losses ℓ_i = ½(r_i − x_iᵀδ)², δ ~ N(0, Σ) (module docstring)."""
    x, r = x.double(), residuals.double()
    k = x @ sigma @ x.T
    return 0.5 * r * r + 0.5 * torch.diagonal(k), torch.outer(r, r) * k + 0.5 * k * k


def correlation(cov: torch.Tensor) -> torch.Tensor:
    std = torch.diagonal(cov).sqrt()
    return cov / torch.outer(std, std)


def susceptibility(mean: torch.Tensor, cov: torch.Tensor, task: slice, *, estimator: str = "covariance",
                   init_loss: float | None = None, full_mean: torch.Tensor | None = None) -> torch.Tensor:
    """χ_j [N] of one restriction (its probe-loss ``mean`` and ``cov``) with task set ``task`` (module docstring);
    the devinterp estimator also needs L0 and the full restriction's means."""
    n = cov.shape[0]
    weights = torch.zeros(n, dtype=torch.float64)
    weights[task] = 1.0 / len(range(n)[task])
    cov_m = cov @ weights  # Cov(m, ℓ_j)
    var_m = weights @ cov_m
    chi = var_m - cov_m
    if estimator == "covariance":
        return chi
    em = weights @ mean
    full_difference = weights @ full_mean - full_mean
    return chi + (em - init_loss) * ((em - mean) - full_difference)


__all__ = ["LinearGaussian", "correlation", "linear_gaussian", "loss_moments", "posterior_covariance",
           "sgld_covariance", "susceptibility"]
