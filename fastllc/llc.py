"""From loss traces to λ̂: the estimator and its diagnostics, shared by every backend.

    λ̂_c = nβ_c · (mean_{t ≥ burn-in} L_m(w_t) − L_n(w*))      per chain c (every ``thin``-th record)
    λ̂   = mean of λ̂_c over healthy chains, with their std and standard error std/√healthy.

A chain is unhealthy when any recorded loss is NaN/inf or exceeds the loss bound (default
100·max(1, L_n(w*)): a chain that far above its start has left the basin). Unhealthy chains are
reported and excluded, never averaged. Split-R̂ and the effective sample size (Vehtari et al. 2021,
rank-free variant) of the healthy traces tell a converged estimate from a drifting one.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .errors import FastLLCError
from .sampling.config import SGLDConfig
from .sampling.contract import Samples


def default_loss_bound(init_loss: float) -> float:
    return 100.0 * max(1.0, init_loss)


def _autocovariance(x: np.ndarray) -> np.ndarray:
    """Autocovariance of each row of x [C, T] at lags 0..T-1 (biased, via FFT)."""
    T = x.shape[1]
    centred = x - x.mean(axis=1, keepdims=True)
    spectrum = np.fft.rfft(centred, n=2 * T, axis=1)
    return np.fft.irfft(spectrum * np.conj(spectrum), axis=1)[:, :T] / T


def split_r_hat(traces: np.ndarray) -> float:
    """Potential scale reduction of traces [C, T] with each chain split in halves (≈1 when mixed)."""
    half = traces.shape[1] // 2
    if half < 2:
        return math.nan
    halves = np.concatenate([traces[:, :half], traces[:, half : 2 * half]])
    within = halves.var(axis=1, ddof=1).mean()
    between = half * halves.mean(axis=1).var(ddof=1)
    if within == 0:
        return math.nan
    var_plus = (half - 1) / half * within + between / half
    return float(np.sqrt(var_plus / within))


def effective_sample_size(traces: np.ndarray) -> float:
    """Multi-chain ESS of traces [C, T], with Geyer's initial monotone sequence truncation."""
    C, T = traces.shape
    if T < 4:
        return math.nan
    acov = _autocovariance(traces)
    within = acov[:, 0].mean() * T / (T - 1)
    between = T * traces.mean(axis=1).var(ddof=1) if C > 1 else 0.0
    var_plus = (T - 1) / T * within + between / T
    if var_plus == 0:
        return math.nan
    rho = 1.0 - (within - acov.mean(axis=0)) / var_plus
    rho[0] = 1.0
    pairs = rho[: T - T % 2].reshape(-1, 2).sum(axis=1)
    positive = np.argmax(pairs <= 0) if np.any(pairs <= 0) else len(pairs)
    pairs = np.minimum.accumulate(pairs[:positive])
    tau = -1.0 + 2.0 * pairs.sum()
    return float(C * T / max(tau, 1.0 / np.log10(C * T + 10)))


def _scalar_or_list(vector: torch.Tensor):
    values = vector.tolist()
    return values[0] if all(v == values[0] for v in values) else values


def _finite_or_none(x: float):
    return x if math.isfinite(x) else None


@dataclass
class LLCResult:
    llc_mean: float
    llc_std: float
    llc_se: float
    llc_per_chain: list  # float per chain, None for an unhealthy chain
    healthy: list  # bool per chain
    healthy_chains: int
    chains: int
    init_loss: float
    nbeta: float | list
    epsilon: float | list
    gamma: float | list
    steps: int
    burn_in: int
    batch_size: int
    orthogonal: bool
    seed: int
    backend: str
    device: str
    sampling_seconds: float
    chain_steps_per_second: float
    r_hat: float
    ess: float
    loss_trace_summary: dict
    loss_trace: torch.Tensor | None = field(default=None, repr=False)  # [C, T]; not serialised
    thin: int = 1
    mala_acceptance: float | None = None  # mean MALA acceptance of healthy chains' steps after burn-in (config.mala)
    control_variate: bool = False  # λ̂ read with the minibatch control variate (``estimate(control_variate=...)``)
    mala_trace: torch.Tensor | None = field(default=None, repr=False)  # [C, T−1]; not serialised
    sampler: str = "sgld"  # SGLDConfig.sampler: which update produced the chains
    sampled_weights: int | None = None  # weights the chains moved when restricted (restrict=); None: all of them

    def to_dict(self) -> dict:
        record = {k: v for k, v in asdict(self).items() if k not in ("loss_trace", "mala_trace")}
        for key, value in record.items():
            if isinstance(value, float):
                record[key] = _finite_or_none(value)
        return record

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)


def estimate_llc(samples: Samples, config: SGLDConfig, label: str | None = None) -> LLCResult:
    """λ̂ with its spread, health flags and convergence diagnostics from a backend's ``Samples``.

    ``label`` (e.g. ``"group 'embed'"``) starts the warning about unhealthy chains: which estimate it concerns."""
    if not math.isfinite(samples.init_loss):  # api.estimate checks before sampling; this covers direct backend use
        raise FastLLCError(f"the loss at w* is {samples.init_loss} (the starting weights or data give a non-finite "
                           "loss); check the model and data")
    trace = samples.loss_trace.double().cpu()
    chains, steps = trace.shape
    recorded = trace[:, config.burn_in + config.thin - 1 :: config.thin]
    bound = config.loss_bound if config.loss_bound is not None else default_loss_bound(samples.init_loss)
    healthy = torch.isfinite(trace).all(dim=1) & (torch.nan_to_num(trace, nan=math.inf) <= bound).all(dim=1)
    per_chain = samples.nbeta * (recorded.mean(dim=1) - samples.init_loss)
    count = int(healthy.sum())
    if count < chains:
        warnings.warn(f"{label + ': ' if label else ''}{chains - count} of {chains} chains diverged or left the basin "
                      f"(loss not finite or above {bound:g}); they are excluded from λ̂", RuntimeWarning, stacklevel=2)
    good = per_chain[healthy]
    mean = float(good.mean()) if count else math.nan
    std = float(good.std(unbiased=True)) if count > 1 else math.nan
    se = std / math.sqrt(count) if count > 1 else math.nan
    good_traces = recorded[healthy].numpy()
    tenth = max(1, good_traces.shape[1] // 10)
    summary = {
        "mean_loss": float(good_traces.mean()) if count else None,
        "first_tenth_mean_loss": float(good_traces[:, :tenth].mean()) if count else None,
        "last_tenth_mean_loss": float(good_traces[:, -tenth:].mean()) if count else None,
        "max_loss": float(good_traces.max()) if count else None,
        "loss_bound": bound,
    }
    return LLCResult(
        llc_mean=mean, llc_std=std, llc_se=se,
        llc_per_chain=[float(v) if h else None for v, h in zip(per_chain.tolist(), healthy.tolist())],
        healthy=healthy.tolist(), healthy_chains=count, chains=chains, init_loss=samples.init_loss,
        nbeta=_scalar_or_list(samples.nbeta), epsilon=_scalar_or_list(samples.epsilon),
        gamma=_scalar_or_list(samples.gamma), steps=steps, burn_in=config.burn_in,
        batch_size=config.batch_size, orthogonal=config.orthogonal, seed=config.seed, sampler=config.sampler_name,
        backend=samples.backend, device=samples.device, sampling_seconds=samples.seconds,
        chain_steps_per_second=(samples.chains_in_batch or chains) * steps / samples.seconds
        if samples.seconds > 0 else math.nan,
        r_hat=split_r_hat(good_traces) if count else math.nan,
        ess=effective_sample_size(good_traces) if count else math.nan,
        loss_trace_summary=summary, loss_trace=trace, thin=config.thin,
        mala_acceptance=_mean_acceptance(samples, healthy, config.burn_in), mala_trace=samples.mala_acceptance,
    )


def _mean_acceptance(samples: Samples, healthy: torch.Tensor, burn_in: int) -> float | None:
    """Mean MALA acceptance over healthy chains' steps t → t+1 with t ≥ burn-in; None when not recorded."""
    if samples.mala_acceptance is None:
        return None
    kept = samples.mala_acceptance[healthy, burn_in:]
    return float(kept.mean()) if kept.numel() else None


class GroupResults(dict):
    """``api.estimate_groups``'s answer: {group name: LLCResult}, in the groups' order, with a table and JSON."""

    def table(self) -> str:
        """One line per group: name, weights sampled, λ̂ ± standard error, healthy chains."""
        width = max([len("group")] + [len(name) for name in self])
        lines = [f"{'group':<{width}}  {'weights':>8}  {'λ̂ ± se':>19}  healthy"]
        for name, r in self.items():
            estimate = "—" if r.healthy_chains == 0 else f"{r.llc_mean:.3g} ± {r.llc_se:.2g}"
            lines.append(f"{name:<{width}}  {r.sampled_weights:>8,}  {estimate:>19}  {r.healthy_chains}/{r.chains}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {name: result.to_dict() for name, result in self.items()}

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)


def divergence_advice(epsilon, nbeta, default_nbeta: float, prefix: str = "--") -> str:
    """What to lower when every chain diverged. The gradient's step is ε·nβ/2: with nβ set far above its
    default n/log n (say 1e300) no smaller ε helps, so that case names nβ; otherwise ε, the usual cause."""
    nbetas = torch.as_tensor(nbeta if nbeta is not None else default_nbeta, dtype=torch.float64).reshape(-1)
    if nbeta is not None and float(nbetas.max()) > 10 * default_nbeta:
        return (f"try a smaller {prefix}nbeta (it is {float(nbetas.max()):g}; the default n/log n is "
                f"{default_nbeta:.4g})")
    return f"try a smaller {prefix}epsilon (it is {float(torch.as_tensor(epsilon).max()):g})"
