"""Choosing ε for any model, and λ̂ with an interval that includes the step size's effect: ONE batched run.

``calibrate(model, data, loss_fn)`` measures κ, the largest Hessian eigenvalue of L_n at w*
(``curvature.top_curvature``), and V, the variance of a minibatch gradient there (``curvature.gradient_noise``),
and runs SGLD at the step scales s = ε·nβ·(κ + nβ·V) in ``step_scales`` (default 0.1 and 0.05) × ``gammas``
(default γ = 5) at nβ = n/log n, ``chains`` chains per cell, as the chains of one batched ``fastllc.estimate``
(chain j of cell k is chain k·chains + j, with its own ε, nβ, γ). Explicit ``epsilons`` (absolute) and
``nbetas`` replace the scaled grid (κ and V are still measured, to name each cell's s).

Why s: SGLD on a direction of curvature h is stable only for ε·nβ·h < 4 and biased there by ~ε·nβ·h/4, and the
minibatch gradient adds (ε·nβ/2)²·V of variance to the ε injected, running every direction hotter by ε·nβ²·V/4;
so the same s means the same step-size bias on any model; the chains' slowest (singular) directions need more
steps the smaller s is. s = 0.1 is where the two errors met on random deep linear networks
(``theory.problems``; docs/calibration.md has the measurements and how the number was chosen). Per cell it
measures:

- λ̂ mean and standard error over the cell's healthy chains, and the healthy fraction;
- ``drift``: (mean loss over the last fifth − mean loss over the first fifth of the post-burn-in trace)
  divided by its spread, the standard error that difference has for stationary chains (σ·√(2·5/ESS), σ the
  pooled within-chain standard deviation of the recorded loss and ESS the cell's effective sample size): a
  z-score, so that minibatch noise (which dominates σ) does not hide a slow trend; and ``drift_relative``,
  the same difference times nβ over λ̂: how much λ̂ itself moved between the two fifths;
- split-R̂ over the cell's healthy chains (each split in halves) and their effective sample size;
- ``locality``: (mean sampled loss − L_n(w*)) / (trivial loss − L_n(w*)), the trivial loss that of the model
  with every weight zero (``curvature.trivial_loss``: log(classes) for a classifier);
- ``step_scale`` s = ε·nβ·κ, and the MALA acceptance (``mala=True``, on a backend that records it: ``generic``).

Flags: ``diverged`` (some chain's loss went non-finite or above the loss bound), ``drifting`` (|drift| >
``DRIFT_LIMIT`` = 3 standard errors AND |drift_relative| > ``DRIFT_RELATIVE`` = 10%), ``unmixed`` (split-R̂ >
``R_HAT_LIMIT``), ``nonlocal`` (locality > ``LOCALITY_LIMIT`` = ½: the chains went halfway to the trivial
predictor's loss, so λ̂ = nβ·ΔL measures the temperature, not the geometry at w*).

The chains' burn-in is coarse (``CoarseBurnIn``): its steps take the step scale ``BURN_IN_STEP_SCALE`` = 1, ten
times the grid's largest, then every cell continues at its own ε. Burn-in draws are discarded, so their step
bias costs nothing; their diffusion carries the chains into the flat directions that only the localisation
holds and that settle in ~2/(εγ) steps, far more than the chains have at the measured step (deep low-rank networks were 33–61%
low without it, their exact finite-nβ target within 10% of λ: docs/calibration.md).

The rule (``recommend``), stated once here and in ``CalibrationResult.reason``: a cell is *usable* when every
chain stayed healthy and it has a λ̂. In the row of nβ nearest n/log n, then of the smallest γ with a
usable cell, the recommended cell is the usable one whose step scale is nearest ``TARGET_STEP_SCALE`` = 0.1, or
``SETTLED_STEP_SCALE`` = 0.05 when the chains had a coarse burn-in (in
log; without κ: the smallest ε). A drifting, unmixed or nonlocal cell stays usable (its λ̂ is still the best
estimate at that step; the reason says what is wrong and the interval carries the drift; nonlocality is set by
nβ, which calibration does not choose): excluding it fell back to
smaller steps, which mix worse. Nothing in the rule rewards agreement between neighbouring ε (the earlier "top
of the plateau" rule let large-ε bias through: 21% median error on random deep linear networks with the
issue's absolute grid, mostly over). Its λ̂ comes with a 90% interval (``interval_of``) that adds to the
standard error the first-order error of the step (twice what halving it moves λ̂), how much λ̂ drifted along
the chains, and the spread over γ values on which λ̂ is flat. No usable cell: no recommendation, and a one-line ``hint``.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .curvature import gradient_noise, nearby_curvature, rmsprop_preconditioner, top_curvature, trivial_loss
from .errors import FastLLCError
from .llc import effective_sample_size, split_r_hat
from .sampling import SGLDConfig, wbic_nbeta
from .sampling.samplers.sgld import SGLD
from .validate import check_float, check_int

DRIFT_LIMIT = 3.0  # |drift| (a z-score) above which, with DRIFT_RELATIVE, a cell is "drifting"
DRIFT_RELATIVE = 0.1  # |drift_relative| (λ̂'s change between the fifths, relative) above which ... likewise
R_HAT_LIMIT = 1.1  # split-R̂ above which a cell is "unmixed"
R_HAT_TARGET = 1.01  # split-R̂ at or below which ``calibrate(target_ess=...)`` stops extending the chains
LOCALITY_LIMIT = 0.5  # a cell whose loss rose this fraction of the way to the trivial loss is "nonlocal"
AGREEMENT_SE = 2.0  # neighbouring ε agree within this many combined standard errors ... (``agree``: reports)
AGREEMENT_RELATIVE = 0.05  # ... or within this fraction of λ̂
DEFAULT_NBETA_MULTIPLES = (1.0,)  # the default nβ grid, as multiples of n/log n (nβ defines λ̂; it is not tuned)
TARGET_STEP_SCALE = 0.1  # the step scale s = ε·nβ·κ recommended (docs/calibration.md: how it was chosen)
SETTLED_STEP_SCALE = 0.05  # ... after a coarse burn-in: settled chains leave only the step's bias, least at the
# grid's smallest step (0.1 balanced that bias against unsettled chains' deficit, which the burn-in removes)
DEFAULT_STEP_SCALES = (0.1, 0.05)  # the target and half of it: their difference is the interval's step term
# The chain length the rule was measured at (docs/calibration.md): λ̂ at a given s still moves with the length on
# singular models (deep linear networks: up past λ at 4× the steps), and at half of it the tails doubled (seed 11:
# 90th percentile 34.6% at 2,000 steps against 25.6% at 4,000, γ = 5 both).
DEFAULT_STEPS = 4000
BURN_IN_STEP_SCALE = 1.0  # the coarse burn-in's s: a quarter of SGLD's stability limit ε·nβ·h < 4 (at 2, the
# burn-in's heat outlasted it: λ̂ at s = 0.05 6% higher on a network whose chains settle early; docs/calibration.md)
BACKOFFS, BACKOFF_FACTOR = 2, 4.0  # a scaled grid diverged or nonlocal everywhere is rerun with s / 4, at most twice
Z90 = 1.6448536269514722  # two-sided 90% normal quantile
FIFTH = 5  # drift compares the first and last 1/FIFTH of the post-burn-in trace


@dataclass
class CalibrationCell:
    """One (ε, nβ, γ) setting and what its chains did."""

    epsilon: float
    nbeta: float
    gamma: float
    llc_mean: float
    llc_se: float
    chains: int
    healthy_chains: int
    healthy_fraction: float
    drift: float  # (last fifth − first fifth mean loss) / its standard error; NaN with no healthy chain
    drift_relative: float  # nβ·(last fifth − first fifth mean loss) / λ̂
    r_hat: float
    ess: float
    mala_acceptance: float | None
    mean_loss: float
    first_fifth_mean_loss: float
    last_fifth_mean_loss: float
    locality: float = math.nan  # (mean loss − L_n(w*)) / (trivial loss − L_n(w*)); NaN when not measured
    step_scale: float = math.nan  # s = ε·nβ·κ (NaN when κ was not measured)
    flags: list = field(default_factory=list)  # "diverged", "drifting", "unmixed", "nonlocal"

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


@dataclass
class Interval:
    """A 90% interval for λ̂ and the three terms in its width (``interval_of``)."""

    low: float
    high: float
    standard_error: float  # Monte Carlo: the chains' spread
    step_term: float  # the step's first-order error: 2·|λ̂ − λ̂ at half the step| (``interval_of``)
    drift_term: float  # |λ̂'s change from the first to the last fifth of the chains|
    gamma_term: float  # spread over the γ values on which λ̂ is flat

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CalibrationResult:
    """Every cell of a calibration grid, the recommended one (index into ``cells``) and why."""

    cells: list
    recommended: int | None
    reason: str
    hint: str | None  # one line when no cell is recommended (e.g. every cell diverged), else None
    n: int
    default_nbeta: float  # n / log n
    chains: int  # per cell
    steps: int
    burn_in: int
    batch_size: int
    seed: int
    backend: str
    device: str
    init_loss: float
    sampling_seconds: float
    kappa: float | None = None  # largest Hessian eigenvalue of L_n at w* (None: not measured)
    gradient_noise: float | None = None  # mean variance of a minibatch gradient's coordinates at w*
    trivial_loss: float | None = None  # the loss with every weight zero
    interval: Interval | None = None  # the recommended λ̂'s 90% interval (``interval_of``)
    control_variate: bool = False  # λ̂ read with the minibatch control variate (``sampling.control_variate``)
    extension: dict | None = None  # ``calibrate(target_ess=...)``: the rounds of longer chains and why they stopped
    coarse_burn_in: dict | None = None  # CoarseBurnIn's settings (steps, ε per nβ) when the chains had one
    mean_traces: np.ndarray | None = field(default=None, repr=False)  # [cells, T]: healthy chains' mean loss

    @property
    def recommended_cell(self) -> CalibrationCell | None:
        return None if self.recommended is None else self.cells[self.recommended]

    def settings(self) -> dict:
        """The recommended cell's ``epsilon``, ``nbeta``, ``gamma`` as ``fastllc.estimate`` keywords."""
        cell = self.recommended_cell
        if cell is None:
            raise FastLLCError(f"no calibration cell is recommended: {self.hint or self.reason}")
        settings = dict(epsilon=cell.epsilon, nbeta=cell.nbeta, gamma=cell.gamma)
        if self.coarse_burn_in is not None:  # the estimate the cell stands for had it: a rerun needs it too, on
            burn = self.coarse_burn_in  # the backend that ran it (a fused SGLD kernel would drop it unsaid)
            settings.update(sampler=CoarseBurnIn(burn["steps"], burn["epsilons"]), backend=self.backend)
        return settings

    def to_dict(self) -> dict:
        record = {k: v for k, v in asdict(self).items() if k not in ("cells", "mean_traces", "interval")}
        record["cells"] = [c.to_dict() for c in self.cells]
        record["interval"] = None if self.interval is None else self.interval.to_dict()
        for key, value in record.items():
            if isinstance(value, float) and not math.isfinite(value):
                record[key] = None
        return record

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def table(self) -> str:
        """The grid as aligned text (★ the recommended cell), then the reason or the hint (as
        ``GroupResults.table``: one string, a line per row)."""
        lines = format_cells([c.to_dict() for c in self.cells], self.recommended)
        if self.recommended is None:
            return "\n".join(lines + [f"no recommendation: {self.hint}"])
        c, band = self.recommended_cell, self.interval
        return "\n".join(lines + [f"recommended: {self.reason}",
                                  f"λ̂ = {c.llc_mean:.4g}, 90% interval [{band.low:.4g}, {band.high:.4g}] "
                                  f"(standard error {c.llc_se:.2g}, step-size term {band.step_term:.2g}, "
                                  f"drift term {band.drift_term:.2g}, γ term {band.gamma_term:.2g})"])


def format_cells(cells: Sequence[Mapping], recommended: int | None) -> list[str]:
    """Cells (dicts) as aligned lines: γ, nβ, ε, λ̂ ± se, healthy, drift (z), Δλ̂ (drift_relative), split-R̂,
    MALA acceptance, flags."""
    lines = [f"{'':1} {'γ':>6} {'nβ':>9} {'ε':>9} {'λ̂ ± se':>19} {'healthy':>7} {'drift':>6} {'Δλ̂':>6} "
             f"{'R̂':>6} {'MALA':>5}  flags"]
    for index, c in enumerate(cells):
        llc = "–" if c.get("llc_mean") is None else f"{c['llc_mean']:9.3g} ± {_text(c.get('llc_se'), '.2g'):<7}"
        mark = "★" if index == recommended else " "
        lines.append(f"{mark} {c['gamma']:>6.3g} {c['nbeta']:>9.4g} {c['epsilon']:>9.3g} "
                     f"{llc:>19} {c['healthy_fraction']:>7.0%} {_text(c.get('drift'), '+.2f'):>6} "
                     f"{_text(c.get('drift_relative'), '+.0%'):>6} "
                     f"{_text(c.get('r_hat'), '.3f'):>6} {_text(c.get('mala_acceptance'), '.2f'):>5}  "
                     f"{','.join(cell_flags(c)) or '-'}")
    return lines


def _text(value, spec: str) -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def check_grid(name: str, values, allow_zero: bool = False) -> tuple[float, ...]:
    """A grid axis as floats: non-empty, finite, > 0 (γ: ≥ 0), no repeats; else a one-line FastLLCError."""
    rule = ">= 0" if allow_zero else "> 0"
    try:
        floats = tuple(float(v) for v in (values if isinstance(values, (list, tuple)) else
                                          torch.as_tensor(values).reshape(-1).tolist()))
    except (TypeError, ValueError, RuntimeError):
        raise FastLLCError(f"calibration grid: {name} must be a list of numbers, got {values!r}") from None
    if not floats:
        raise FastLLCError(f"calibration grid: {name} is empty; give at least one value")
    bad = [v for v in floats if not (math.isfinite(v) and (v >= 0 if allow_zero else v > 0))]
    if bad:
        raise FastLLCError(f"calibration grid: {name} has {bad[0]:g}; every value must be finite and {rule}")
    if len(set(floats)) < len(floats):
        repeated = next(v for v in floats if floats.count(v) > 1)
        raise FastLLCError(f"calibration grid: {name} lists {repeated:g} twice; give each value once")
    return tuple(sorted(floats))


class CoarseBurnIn(SGLD):
    """Plain SGLD, except that the first ``steps`` steps of every chain take the step ``epsilons[nβ]`` (the
    chain's own ε where that is larger): a coarse burn-in.

    Why: the burn-in's draws are discarded, so its step-size bias costs nothing, but its diffusion is what
    carries the chains from w* into the flat (singular) directions, which the localisation alone holds and
    which settle in ~2/(εγ) steps: 250,000 at a deep network's ε = 8e-6 and γ = 1, against 4,000 steps
    (docs/calibration.md, "Why deep low-rank networks came out low"). The stiff directions, hot after the
    burn-in, settle again within ~2/s steps of the measured step. Named ``sgld`` (after the burn-in it is);
    ``calibrate`` runs it only on a backend that runs sampler objects (``backends`` capability ``samplers``),
    never on a fused SGLD kernel that would ignore the burn-in."""

    title = "SGLD with a coarse burn-in"
    NAMEABLE = False

    def __init__(self, steps: int, epsilons: Mapping[float, float]):
        self.steps, self.epsilons = int(steps), {float(b): float(e) for b, e in epsilons.items()}

    def __eq__(self, other):
        return isinstance(other, CoarseBurnIn) and (other.steps, other.epsilons) == (self.steps, self.epsilons)

    def __hash__(self):
        return hash((self.steps, tuple(sorted(self.epsilons.items()))))

    def __repr__(self):
        return f"CoarseBurnIn(steps={self.steps}, epsilons={self.epsilons})"

    def settings(self) -> dict:
        return {"burn_in_steps": self.steps, "burn_in_epsilons": {str(b): e for b, e in self.epsilons.items()}}

    def coarse(self, epsilon: float, nbeta: float) -> float:
        """The burn-in step of a chain with step ``epsilon`` at ``nbeta`` (the nearest nβ's entry)."""
        nearest = min(self.epsilons, key=lambda b: abs(math.log(b / nbeta)))
        return max(epsilon, self.epsilons[nearest])

    def start(self, w_star):
        return 0  # steps taken

    def increment(self, state, w, w_star, grad, noise, epsilon, gamma, nbeta):
        step = self.coarse(epsilon, nbeta) if state < self.steps else epsilon
        return SGLD.increment(self, None, w, w_star, grad, noise, step, gamma, nbeta)[0], state + 1

    def batched(self, layout, W, epsilon, gamma, nbeta):
        coarse = torch.tensor([self.coarse(e, b) for e, b in zip(epsilon.tolist(), nbeta.tolist())],
                              dtype=epsilon.dtype)
        factor = layout.coefficient(coarse / epsilon, W.device)  # G arrives as −(ε·nβ/2)∇L_m: rescaled to ε_burn
        hot, cold = SGLD.batched(self, layout, W, coarse, gamma, nbeta), SGLD.batched(self, layout, W, epsilon,
                                                                                     gamma, nbeta)
        taken = 0

        def update(G, noise, projection=None):
            nonlocal taken
            taken += 1
            if taken > self.steps:
                return cold(G, noise, projection)
            G.mul_(factor)
            return hot(G, noise, projection)
        return update


def calibrate(model: torch.nn.Module, data, loss_fn=F.cross_entropy, *, epsilons=None,
              step_scales=DEFAULT_STEP_SCALES, nbetas=None,
              gammas=(SGLDConfig.gamma,), chains: int = 4, steps: int = DEFAULT_STEPS, burn_in: int | None = None,
              batch_size: int | None = None, seed: int = 0, backend: str = "auto", device="cpu",
              progress: bool = False, mala: bool = False, restrict=None, target_ess: float | None = None,
              max_chain_steps: int | None = None, burn_in_scale: float | None = BURN_IN_STEP_SCALE,
              **settings) -> CalibrationResult:
    """Run the grid of step sizes × ``nbetas`` × ``gammas`` (``chains`` chains per cell) as one batched
    ``fastllc.estimate``, recommend a cell and extrapolate λ̂ to ε → 0 by the rule in this module's docstring.

    The step sizes: ``epsilons`` (absolute values), or by default ε = s/(nβ·κ) for each s in ``step_scales``,
    κ measured at w* (``result.kappa``). ``nbetas``: absolute nβ values; default n/log n. ``gammas`` default:
    ``SGLDConfig``'s γ = 5.
    ``burn_in`` default: a quarter of ``steps``. ``burn_in_scale``: the burn-in runs at this step scale (default
    ``BURN_IN_STEP_SCALE``; per nβ, burn_in_scale/max(step_scales) times the grid's largest ε), on a backend
    that runs sampler objects (``CoarseBurnIn``); None, explicit ``epsilons``, another sampler or no burn-in:
    plain SGLD throughout. ``result.settings()`` then carries the sampler and the backend that ran it, so that an
    estimate at the recommended cell is run as the cell was (its ``burn_in`` should cover the coarse steps,
    ``result.coarse_burn_in["steps"]``: a quarter of the calibration's chain). ``batch_size`` default: ``SGLDConfig``'s (64), or a
    DataLoader's. ``mala=True`` records the MALA acceptance (``backend="auto"`` then picks ``generic``).
    Other ``SGLDConfig`` fields (``thin``, ``orthogonal``, ``sampler``, ``chain_loss``, ``loss_bound``) and
    ``restrict`` pass through to ``estimate``. A grid value that is not finite and > 0 (γ: ≥ 0), an empty
    axis or a repeated value is refused in one line before any work. A grid in which every cell diverges is
    not an error: the result has every cell flagged, no recommendation and a ``hint``.

    ``target_ess``: then the recommended cell and its half-step neighbour are run again with twice the steps
    (and twice the burn-in) until the recommended cell has split-R̂ ≤ ``R_HAT_TARGET`` (1.01) and an ESS of
    at least ``target_ess``, or until the next round would take the chain-steps spent in all past
    ``max_chain_steps`` (default: 8× the first grid's); ``result.extension`` says what happened. Each round
    restarts from w* with the same seed, so a chain's first steps repeat the previous round's exactly: the cost
    of a round is its own steps, the evidence that of one chain twice as long.
    """
    from .loaders import as_pair, is_loader, materialise

    _check_lengths(chains, steps, burn_in, target_ess, max_chain_steps)
    scaled = epsilons is None
    epsilons = check_grid("step_scales" if scaled else "epsilons", step_scales if scaled else epsilons)
    gammas = check_grid("gammas", gammas, allow_zero=True)
    if nbetas is not None:
        nbetas = check_grid("nbetas", nbetas)
    if is_loader(data):
        batch_size = batch_size or data.batch_size
        data = materialise(data)
    n = len(as_pair(data)[1])
    default = wbic_nbeta(n)
    nbetas = nbetas or tuple(m * default for m in DEFAULT_NBETA_MULTIPLES)
    preconditioner = start_preconditioner(model, as_pair(data), loss_fn, batch_size, settings)
    kappa = measured_curvature(model, as_pair(data), loss_fn, seed, required=scaled, nbeta=min(nbetas),
                               preconditioner=preconditioner)
    noise = None if kappa is None else gradient_noise(model, as_pair(data), loss_fn, seed=seed,
                                                      batch_size=batch_size or SGLDConfig.batch_size,
                                                      preconditioner=preconditioner)
    cells = [(s / step_scale(1.0, b, kappa, noise) if scaled else s, b, g) for g in gammas for b in nbetas
             for s in epsilons]
    burn_in = steps // 4 if burn_in is None else burn_in
    coarse = None
    if burn_in_scale is not None and burn_in and scaled and settings.get("sampler", SGLDConfig.sampler) == "sgld":
        coarse = _object_backend(backend, device, model, loss_fn, mala, restrict)
    ratio = None if coarse is None else check_float("burn_in_scale", burn_in_scale, above=0) / max(epsilons)

    def run(cells, steps, burn_in, coarsely=True):
        extra = {} if coarse is None or not coarsely else dict(sampler=coarse_burn_in(cells, burn_in, ratio))
        result = run_cells(model, data, loss_fn, cells, chains=chains, steps=steps, burn_in=burn_in,
                           batch_size=batch_size, seed=seed, backend=coarse or backend, device=device,
                           progress=progress, mala=mala, restrict=restrict, default_nbeta=default, kappa=kappa,
                           noise=noise, **{**settings, **extra})
        if extra:
            result.coarse_burn_in = dict(steps=burn_in, epsilons=extra["sampler"].epsilons)
        return result

    result = _backing_off(run, cells, steps, burn_in, BACKOFFS if scaled else 0)
    budget = 8 * len(cells) * chains * steps if max_chain_steps is None else max_chain_steps
    coarsely = result.coarse_burn_in is not None  # longer rounds run as the first did

    def rerun(cells, steps, burn_in):
        return run(cells, steps, burn_in, coarsely)
    return result if target_ess is None else extend(result, rerun, target_ess, budget)


def coarse_burn_in(cells: Sequence[tuple[float, float, float]], burn_in: int, ratio: float) -> CoarseBurnIn:
    """The coarse burn-in of a grid: per nβ, ``ratio`` × its largest ε (``BURN_IN_STEP_SCALE``/0.1 = 10× the
    s = 0.1 cell's step). Tied to the grid's ε, so a backed-off grid backs its burn-in off with it."""
    largest: dict[float, float] = {}
    for epsilon, nbeta, _ in cells:
        largest[nbeta] = max(largest.get(nbeta, 0.0), epsilon)
    return CoarseBurnIn(burn_in, {nbeta: ratio * epsilon for nbeta, epsilon in largest.items()})


def _object_backend(backend: str, device, model, loss_fn, mala: bool, restrict) -> str | None:
    """The backend that runs ``CoarseBurnIn`` as its own update (capability ``samplers``), or None (then there
    is no coarse burn-in): a fused SGLD kernel would run plain SGLD under its name."""
    from .backends import resolve_backend

    needs = ("samplers",) + (("mala",) if mala else ()) + (("restrict",) if restrict is not None else ())
    try:
        return resolve_backend(backend, device, model, loss_fn, needs=needs)
    except FastLLCError:
        return None


def _check_lengths(chains, steps, burn_in, target_ess, max_chain_steps) -> None:
    check_int("chains", chains)  # the count itself: run_cells
    check_int("steps", steps, minimum=1)
    if burn_in is not None:
        check_int("burn_in", burn_in, minimum=0)
    if target_ess is not None:
        check_float("target_ess", target_ess, above=0)
    if max_chain_steps is not None:
        check_int("max_chain_steps", max_chain_steps, minimum=1)


def _backing_off(run, cells, steps: int, burn_in: int, backoffs: int) -> CalibrationResult:
    """``run(cells)``, and again with every ε divided by ``BACKOFF_FACTOR`` (at most ``backoffs`` times) while
    every cell diverged or left the basin: κ at w* can understate the curvature the chains meet later. A grid
    lost with the coarse burn-in is first run again without it, and backed-off grids run without it."""
    result = run(cells, steps, burn_in)
    if result.coarse_burn_in is not None and _all_lost(result):  # the burn-in's 10× step may be what diverged
        result = run(cells, steps, burn_in, False)
        result.reason += (" (every cell diverged or left the basin with the coarse burn-in, so the chains were run "
                          "again without it)")
    for attempt in range(1, 1 + backoffs):
        if not _all_lost(result):
            break
        cells = [(e / BACKOFF_FACTOR, b, g) for e, b, g in cells]
        result = run(cells, steps, burn_in, False)  # κ understated: the burn-in's 10× would be past stability
        result.reason = (f"{result.reason} (every cell diverged or left the basin at {attempt} larger grid(s), so "
                         f"the step scales were divided by {BACKOFF_FACTOR ** attempt:g}: κ at w* understates the "
                         "curvature the chains meet, e.g. along flat valleys or off a confident classifier's "
                         "saturated softmax)")
    return result


def _all_lost(result: CalibrationResult) -> bool:
    return all({"diverged", "nonlocal"} & set(c.flags) for c in result.cells)


def extend(result: CalibrationResult, run, target_ess: float, budget: int) -> CalibrationResult:
    """Double the steps of the recommended cell and its half-step neighbour until the recommended cell is
    converged (split-R̂ ≤ R_HAT_TARGET, ESS ≥ ``target_ess``) or the chain-steps would exceed ``budget``
    (``calibrate``'s docstring); ``run(cells, steps, burn_in)`` runs the cells. ``result.extension`` records
    every round (steps, the recommended λ̂, split-R̂, ESS) and why it stopped."""
    spent = len(result.cells) * result.chains * result.steps
    rounds = []
    while True:
        cell = result.recommended_cell
        if cell is not None:
            rounds.append(dict(steps=result.steps, llc_mean=cell.llc_mean, r_hat=cell.r_hat, ess=cell.ess))
        if cell is None:
            status = f"no usable cell after {result.steps} steps: {result.hint}"
            break
        if cell.r_hat <= R_HAT_TARGET and cell.ess >= target_ess:
            status = f"converged: split-R̂ {cell.r_hat:.3f} ≤ {R_HAT_TARGET}, ESS {cell.ess:.0f} ≥ {target_ess:g}"
            break
        neighbour = half_step([c.to_dict() for c in result.cells], result.recommended)
        pair = [result.recommended] + ([] if neighbour is None else [neighbour])
        cost = len(pair) * result.chains * 2 * result.steps
        if spent + cost > budget:
            status = (f"budget: split-R̂ {cell.r_hat:.3f}, ESS {cell.ess:.0f} after {result.steps} steps; another "
                      f"round would take {spent + cost:,} chain-steps in all, over max_chain_steps = {budget:,}")
            break
        cells = [(result.cells[i].epsilon, result.cells[i].nbeta, result.cells[i].gamma) for i in pair]
        result = run(cells, 2 * result.steps, 2 * result.burn_in)
        spent += cost
    result.extension = dict(rounds=rounds, chain_steps=spent, status=status)
    return result



def step_scale(epsilon: float, nbeta: float, kappa: float, noise: float) -> float:
    """s = ε·nβ·(κ + nβ·V): the Euler step's ε·nβ·κ and the minibatch noise's ε·nβ²·V (V the gradient noise,
    ``curvature.gradient_noise``), each of which raises λ̂ by about s/4 of itself (module docstring)."""
    return epsilon * nbeta * (kappa + nbeta * noise)


def start_preconditioner(model, data, loss_fn, batch_size: int | None, settings: Mapping) -> dict | None:
    """RMSProp-SGLD's preconditioner at w* when that is the sampler (``curvature.rmsprop_preconditioner``), else
    None: the step scale of a preconditioned step is ε·nβ·κ(P^½ H P^½)."""
    if settings.get("sampler", SGLDConfig.sampler) != "rmsprop_sgld":
        return None
    return rmsprop_preconditioner(model, data, loss_fn, batch_size=batch_size or SGLDConfig.batch_size,
                                  delta=settings.get("rmsprop_eps", SGLDConfig.rmsprop_eps))


def measured_curvature(model, data, loss_fn, seed: int, required: bool, nbeta: float,
                       preconditioner: dict | None = None) -> float | None:
    """κ at w* (``curvature.top_curvature``; of P^½ H P^½ with RMSProp-SGLD's ``preconditioner``); where
    nβ·κ < 1 (no direction confines the chains within a unit of the potential), the largest curvature near w*
    instead (``curvature.nearby_curvature``). Needed to scale the grid; otherwise only reported, so a model that
    torch.func cannot differentiate twice just goes without (None)."""
    try:
        kappa = top_curvature(model, data, loss_fn, seed=seed, preconditioner=preconditioner)
        if math.isfinite(kappa) and nbeta * kappa < 1:
            kappa = max(kappa, nearby_curvature(model, data, loss_fn, nbeta, seed=seed, preconditioner=preconditioner))
    except Exception as err:  # any failure of torch.func on a user's model: explicit epsilons still work
        if required:
            raise FastLLCError(f"cannot measure the loss's curvature at w* to scale the step size ({err}); give "
                               "epsilons explicitly") from None
        return None
    if required and not (math.isfinite(kappa) and kappa > 0):
        raise FastLLCError(f"the loss has no curvature at w* to scale the step size by (κ = {kappa:g}); give "
                           "epsilons explicitly")
    return kappa


def run_cells(model, data, loss_fn, cells: Sequence[tuple[float, float, float]], *, chains: int,
              default_nbeta: float, config: SGLDConfig | None = None, backend="auto", device="cpu",
              progress=False, restrict=None, kappa: float | None = None, noise: float | None = None,
              **settings) -> CalibrationResult:
    """The given (ε, nβ, γ) cells (absolute values, any list) as one batched estimate; the calibration
    result. ``config``: settings every cell shares (its chains, ε, nβ, γ are replaced). ``kappa`` and ``noise``:
    the curvature and the minibatch gradient variance at w* if measured (they give each cell's step scale)."""
    from .api import estimate
    from .loaders import as_pair, is_loader, materialise

    if not isinstance(chains, int) or isinstance(chains, bool) or chains < 1:
        raise FastLLCError(f"calibration needs at least one chain per cell, got chains = {chains!r}")
    if settings.get("batch_size") is None:
        settings.pop("batch_size", None)
    if is_loader(data):
        settings.setdefault("batch_size", data.batch_size)
        data = materialise(data)
    n = len(as_pair(data)[1])
    per_chain = {name: [cell[axis] for cell in cells for _ in range(chains)]
                 for axis, name in enumerate(("epsilon", "nbeta", "gamma"))}
    config = replace(config or SGLDConfig(), **settings, chains=len(cells) * chains, **per_chain)
    result = estimate(model, data, loss_fn, config, backend=backend, device=device, progress=progress,
                      restrict=restrict, control_variate="auto")
    config = replace(config, batch_size=result.batch_size)
    trace = result.loss_trace.double().numpy()
    per_chain_llc = np.array([math.nan if v is None else v for v in result.llc_per_chain])
    healthy = np.array(result.healthy, dtype=bool)
    recorded = trace[:, config.burn_in + config.thin - 1 :: config.thin]
    mala = None if result.mala_trace is None else result.mala_trace.double().numpy()[:, config.burn_in:]
    trivial = trivial_loss(model, as_pair(data), loss_fn)
    gap = trivial - result.init_loss  # how far the trivial predictor's loss is above w*'s
    measured, means = [], []
    for index, (epsilon, nbeta, gamma) in enumerate(cells):
        rows = slice(index * chains, (index + 1) * chains)
        cell = measure_cell(epsilon, nbeta, gamma, per_chain_llc[rows], healthy[rows], recorded[rows],
                            None if mala is None else mala[rows])
        if gap > 0 and cell.healthy_chains:
            cell.locality = (cell.mean_loss - result.init_loss) / gap
        if kappa is not None:
            cell.step_scale = step_scale(epsilon, nbeta, kappa, noise or 0.0)
        cell.flags = cell_flags(cell.to_dict())
        measured.append(cell)
        good = trace[rows][healthy[rows]]
        means.append(good.mean(axis=0) if len(good) else np.full(trace.shape[1], math.nan))
    dicts = [c.to_dict() for c in measured]
    settled = isinstance(config.sampler, CoarseBurnIn) and config.sampler.steps > 0
    recommended, reason, hint = recommend(dicts, default_nbeta, SETTLED_STEP_SCALE if settled else TARGET_STEP_SCALE)
    if hint is not None:
        warnings.warn(f"calibration: {hint}", RuntimeWarning, stacklevel=3)
    return CalibrationResult(
        cells=measured, recommended=recommended, reason=reason, hint=hint, n=n,
        default_nbeta=default_nbeta, chains=chains, steps=config.steps, burn_in=config.burn_in,
        batch_size=config.batch_size, seed=config.seed, backend=result.backend, device=result.device,
        init_loss=result.init_loss, sampling_seconds=result.sampling_seconds, kappa=kappa, gradient_noise=noise,
        trivial_loss=trivial,
        control_variate=result.control_variate,
        interval=interval_of(dicts, recommended), mean_traces=np.array(means))


def measure_cell(epsilon, nbeta, gamma, llc: np.ndarray, healthy: np.ndarray, recorded: np.ndarray,
                 mala: np.ndarray | None) -> CalibrationCell:
    """λ̂, drift, split-R̂, ESS, MALA acceptance and flags of one cell from its chains' post-burn-in records."""
    count, total = int(healthy.sum()), len(healthy)
    good = recorded[healthy]
    mean = float(llc[healthy].mean()) if count else math.nan
    se = float(llc[healthy].std(ddof=1) / math.sqrt(count)) if count > 1 else math.nan
    drift = first = last = math.nan
    ess = effective_sample_size(good) if count else math.nan
    if count:
        width = max(1, good.shape[1] // FIFTH)
        first, last = float(good[:, :width].mean()), float(good[:, -width:].mean())
        drift = drift_score(good, first, last, ess)
    cell = CalibrationCell(
        epsilon=float(epsilon), nbeta=float(nbeta), gamma=float(gamma), llc_mean=mean, llc_se=se, chains=total,
        healthy_chains=count, healthy_fraction=count / total, drift=drift,
        drift_relative=nbeta * (last - first) / abs(mean) if count and mean != 0 else math.nan,
        r_hat=split_r_hat(good) if count else math.nan, ess=ess,
        mala_acceptance=float(mala[healthy].mean()) if mala is not None and count and mala.size else None,
        mean_loss=float(good.mean()) if count else math.nan, first_fifth_mean_loss=first, last_fifth_mean_loss=last)
    cell.flags = cell_flags(cell.to_dict())
    return cell


def drift_score(good: np.ndarray, first: float, last: float, ess: float) -> float:
    """(last − first) / σ·√(2·FIFTH/ESS): the standard error of the difference of two fifths' means of
    stationary chains with ``ess`` effective draws in all (NaN when it cannot be estimated: too short)."""
    if good.shape[1] < 2 * FIFTH or not math.isfinite(ess) or ess <= 0:
        return math.nan
    sigma = float(np.sqrt(good.var(axis=1, ddof=1).mean()))
    if sigma == 0:
        return 0.0 if last == first else math.inf
    return (last - first) / (sigma * math.sqrt(2 * FIFTH / ess))


def cell_flags(cell: Mapping) -> list[str]:
    """What is wrong with a cell (a dict of its measurements): "diverged", "drifting", "unmixed", "nonlocal".

    Reads the study's older job records too, which have no ``drift``: there the last tenth of the trace
    more than 10% away from the first tenth's mean loss counts as drifting (the rule they were made with)."""
    flags = []
    if cell["healthy_fraction"] < 1:
        flags.append("diverged")
    if cell.get("healthy_fraction", 0) > 0:
        if "drift" in cell:
            drift, relative = cell["drift"], cell.get("drift_relative")  # None: too short to tell (< 10 records)
            drifting = (drift is not None and not abs(drift) <= DRIFT_LIMIT
                        and (relative is None or not abs(relative) <= DRIFT_RELATIVE))
        else:
            first, last, mean = (cell.get(k) for k in ("first_tenth_mean_loss", "last_tenth_mean_loss", "mean_loss"))
            drifting = None in (first, last, mean) or abs(last - first) >= 0.1 * max(abs(mean), 1e-12)
        if drifting:
            flags.append("drifting")
        r_hat = cell.get("r_hat")
        if r_hat is not None and math.isfinite(r_hat) and r_hat > R_HAT_LIMIT:
            flags.append("unmixed")
        locality = cell.get("locality")
        if locality is not None and math.isfinite(locality) and locality > LOCALITY_LIMIT:
            flags.append("nonlocal")
    return flags


def usable(cell: Mapping) -> bool:
    """Every chain healthy, and a λ̂. A drifting or unmixed cell is usable: its λ̂ is the best there is at that
    step, and its interval carries the drift (``interval_of``); excluding it fell back to smaller steps, which
    mix worse (docs/calibration.md). A nonlocal cell is usable too, with the caveat in the reason: how far the
    chains go towards the trivial loss is set by nβ (λ̂/nβ nats above L_n(w*)), which calibration does not
    choose; a smaller ε does not bring them back (the study's p = 23 network sits at 0.51 at ε = 6e-4)."""
    return "diverged" not in cell_flags(cell) and cell.get("llc_mean") is not None and math.isfinite(cell["llc_mean"])


def agree(cell: Mapping, smaller: Mapping | None) -> bool:
    """Both unflagged with a λ̂, and λ̂ within AGREEMENT_SE combined standard errors or AGREEMENT_RELATIVE of λ̂
    (the earlier rule's plateau test; ``experiments.report`` marks old records' plateaus with it)."""
    if smaller is None or cell_flags(cell) or cell_flags(smaller) or not (usable(cell) and usable(smaller)):
        return False
    difference = abs(cell["llc_mean"] - smaller["llc_mean"])
    ses = [s for s in (cell.get("llc_se"), smaller.get("llc_se")) if s is not None and math.isfinite(s)]
    combined = math.sqrt(sum(s * s for s in ses)) if len(ses) == 2 else 0.0
    return difference <= max(AGREEMENT_SE * combined, AGREEMENT_RELATIVE * abs(cell["llc_mean"]))


def recommend(cells: Sequence[Mapping], default_nbeta: float, target: float = TARGET_STEP_SCALE
              ) -> tuple[int | None, str, str | None]:
    """(index of the recommended cell or None, the reason in words, a one-line hint when None).

    ``cells``: dicts with epsilon, nbeta, gamma, llc_mean, llc_se, healthy_fraction, drift and
    drift_relative (or the older records' tenth means), r_hat. ``target``: the step scale aimed at
    (``SETTLED_STEP_SCALE`` for chains that had a coarse burn-in). The rule is the module docstring's."""
    if not cells:
        return None, "no cells", "the grid is empty"
    candidates = [i for i, c in enumerate(cells) if usable(c)]
    if candidates:
        row = preferred_row(cells, candidates, default_nbeta)
        in_row = [i for i in candidates if row_of(cells[i]) == row]
        scaled = all(_finite(cells[i].get("step_scale")) > 0 for i in in_row)
        if scaled:  # the step scale nearest the target (in log; a tie goes to the smaller step)
            best = min(in_row, key=lambda i: (round(abs(math.log(cells[i]["step_scale"] / target)), 9),
                                              cells[i]["epsilon"]))
        else:
            best = min(in_row, key=lambda i: cells[i]["epsilon"])
        c = cells[best]
        how = (f"the step scale ε·nβ·κ = {c['step_scale']:.3g} nearest {target:g}" if scaled else
               "the smallest ε (least discretisation bias; κ unknown, so no step scale)")
        unsettled = [f for f in cell_flags(c) if f in ("drifting", "unmixed")]
        caveat = (f"; its chains are {' and '.join(unsettled)} (λ̂ moved {_finite(c.get('drift_relative')):+.0%} "
                  "along them; the interval includes it): run more steps, or target_ess, to settle them"
                  if unsettled else "")
        if "nonlocal" in cell_flags(c):
            caveat += (f"; its chains went {_finite(c.get('locality')):.0%} of the way from L_n(w*) to the trivial "
                       "predictor's loss: at this nβ, λ̂ measures the temperature as much as the geometry at w*")
        return best, (f"ε = {c['epsilon']:g}, nβ = {c['nbeta']:g}, γ = {c['gamma']:g}: {how}, among cells whose "
                      f"chains all stayed healthy, in the row of nβ nearest n/log n = "
                      f"{default_nbeta:.4g}, then of the smallest γ{caveat}"), None
    if all(c["healthy_fraction"] == 0 for c in cells):
        hint = (f"every cell diverged (no chain stayed finite and below the loss bound): try smaller epsilons, "
                f"below {min(c['epsilon'] for c in cells):g}")
    elif all("diverged" in cell_flags(c) for c in cells):
        hint = f"every cell had diverging chains: try smaller epsilons, below {min(c['epsilon'] for c in cells):g}"
    elif all("nonlocal" in cell_flags(c) for c in cells if c["healthy_fraction"] > 0):
        hint = ("every cell's chains left the basin of w* (their loss rose halfway to the trivial predictor's): "
                "try a larger gamma or smaller epsilons")
    else:
        hint = ("no cell kept every chain healthy and local (diverging chains or chains that left the basin): "
                f"try smaller epsilons, below {min(c['epsilon'] for c in cells):g}, or a larger gamma")
    return None, "no cell is usable", hint


def row_of(cell: Mapping) -> tuple[float, float]:
    return cell["nbeta"], cell["gamma"]


def preferred_row(cells: Sequence[Mapping], candidates: Sequence[int], default_nbeta: float) -> tuple[float, float]:
    """(nβ, γ) of the row the recommendation comes from: nβ nearest (in log) the default, then the smallest γ."""
    def preference(i):
        return round(abs(math.log(cells[i]["nbeta"] / default_nbeta)), 9), cells[i]["gamma"]
    return row_of(cells[min(candidates, key=preference)])


def half_step(cells: Sequence[Mapping], index: int) -> int | None:
    """The usable cell at the next smaller ε in ``index``'s row, else at the next larger, else None: the cell
    whose λ̂ gives the interval's step term (and which ``extend`` reruns beside the recommended one)."""
    row = sorted((i for i, c in enumerate(cells) if row_of(c) == row_of(cells[index]) and usable(c)),
                 key=lambda i: cells[i]["epsilon"])
    place = row.index(index)
    return row[place - 1] if place > 0 else (row[place + 1] if place + 1 < len(row) else None)


def interval_of(cells: Sequence[Mapping], recommended: int | None) -> Interval | None:
    """The recommended λ̂'s 90% interval: λ̂ ± Z90·√(se² + step² + drift² + γ²).

    ``step`` is the first-order error of λ̂ at the chosen ε read from its neighbour ε' in the row (the next
    smaller usable ε, else the next larger; 0 with neither), ``first_order_error``: the larger of the two
    first-order readings of |λ̂(ε) − λ̂(ε')|, a bias growing as ε (the Euler step, minibatch noise) and a deficit
    shrinking as 1/ε (chains too short for the flat directions); 2·|λ̂(ε) − λ̂(ε/2)| on the default grid. The
    standard error sees neither. ``drift`` = |drift_relative|·λ̂, how much λ̂ moved between the first and last
    fifth of the chains (a trend below the flag's threshold is still an error of about that size); and ``γ`` the
    standard deviation of λ̂ over the γ rows (same nβ and step scale) that agree with it within two combined
    standard errors (λ̂ flat in γ: their differences are the localisation's uncertainty)."""
    if recommended is None:
        return None
    chosen = cells[recommended]
    neighbour = half_step(cells, recommended)
    step = 0.0 if neighbour is None else first_order_error(chosen, cells[neighbour])
    se = _finite(chosen["llc_se"])
    same = [c["llc_mean"] for c in cells if usable(c) and c["nbeta"] == chosen["nbeta"]
            and _same_step(c, chosen) and abs(c["llc_mean"] - chosen["llc_mean"])
            <= 2 * math.hypot(se, _finite(c["llc_se"]))]
    gamma = float(np.std(same, ddof=1)) if len(same) > 1 else 0.0
    drift = abs(_finite(chosen.get("drift_relative")) * chosen["llc_mean"])
    half = Z90 * math.sqrt(se**2 + step**2 + drift**2 + gamma**2)
    return Interval(low=chosen["llc_mean"] - half, high=chosen["llc_mean"] + half, standard_error=se,
                    step_term=step, drift_term=drift, gamma_term=gamma)


def first_order_error(chosen: Mapping, neighbour: Mapping) -> float:
    """|λ̂(ε) − λ| from λ̂ at ε and at the neighbour's ε' ≠ ε, bounding both first-order errors: if λ̂ = λ + b·ε,
    λ̂(ε) − λ = Δ·ε/(ε − ε'); if λ̂ = λ − c/ε, it is Δ·ε'/(ε' − ε) (Δ = λ̂(ε) − λ̂(ε')); so |Δ|·max(ε, ε')/|ε − ε'|,
    2·|Δ| for a neighbour at half or twice the step. Neighbours closer than that amplify Δ's noise by the same
    factor (10 at ε' = 0.9·ε)."""
    epsilon, other = chosen["epsilon"], neighbour["epsilon"]
    if epsilon == other:
        raise FastLLCError(f"the step-size term needs two different step sizes; both cells have ε = {epsilon:g}")
    return abs(chosen["llc_mean"] - neighbour["llc_mean"]) * max(epsilon, other) / abs(epsilon - other)


def _finite(value) -> float:
    return value if value is not None and math.isfinite(value) else 0.0


def _same_step(cell: Mapping, other: Mapping) -> bool:
    """The same step scale s (or, without κ, the same ε)."""
    a, b = cell.get("step_scale"), other.get("step_scale")
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
        return cell["epsilon"] == other["epsilon"]
    return math.isclose(a, b, rel_tol=1e-6)
