"""Choosing ε, nβ and γ for any model: a grid of settings run as the chains of ONE batched estimate.

``calibrate(model, data, loss_fn, epsilons=[...], nbetas=[...], gammas=[...])`` runs every cell of the grid
ε × nβ × γ with ``chains`` chains each (chain j of cell k is chain k·chains + j of the batch, with its own
per-chain ε, nβ, γ: ``SGLDConfig`` takes them as vectors) and measures per cell:

- λ̂ mean and standard error over the cell's healthy chains, and the healthy fraction;
- ``drift``: (mean loss over the last fifth − mean loss over the first fifth of the post-burn-in trace)
  divided by its spread, the standard error that difference has for stationary chains (σ·√(2·5/ESS), σ the
  pooled within-chain standard deviation of the recorded loss and ESS the cell's effective sample size): a
  z-score, so that minibatch noise (which dominates σ) does not hide a slow trend; and ``drift_relative``,
  the same difference times nβ over λ̂: how much λ̂ itself moved between the two fifths;
- split-R̂ over the cell's healthy chains (each split in halves) and their effective sample size;
- the MALA acceptance (``mala=True``, on a backend that records it: ``generic``; it compares the potential at
  both ends of a step on different minibatches, so with nβ·(minibatch noise of L) ≫ 1 it sits near ½ whatever ε).

Flags: ``diverged`` (some chain's loss went non-finite or above the loss bound), ``drifting`` (|drift| >
``DRIFT_LIMIT`` = 3 standard errors AND |drift_relative| > ``DRIFT_RELATIVE`` = 10%: a trend that is both
real and large enough to matter; a z-score alone flags every slow approach once the chains are many and
long), ``unmixed`` (split-R̂ > ``R_HAT_LIMIT``).

The rule (``recommend``), stated once here and in ``CalibrationResult.reason``:
1. A cell is *usable* when it has no flag and a λ̂.
2. The row (nβ, γ) it is taken from: among rows with two usable cells at neighbouring ε, the nβ nearest
   (in log) to the default nβ = n/log n, then the smallest γ (the least localisation bias).
3. In that row, among neighbouring usable pairs: if some pair *agrees* (|Δλ̂| ≤ ``AGREEMENT_SE`` combined
   standard errors or ≤ ``AGREEMENT_RELATIVE`` of λ̂: a plateau), the larger ε of the agreeing pair with
   the largest ε (the top of the plateau: best mixed, its bias bounded by the agreement); else the *flattest*
   pair (the smallest |Δλ̂|/λ̂), or, among the pairs as flat as it within two of its standard errors, the one
   with the largest ε, its larger ε, stated as "no plateau evidence". SGLD's λ̂ is low where ε
   is too small to mix in the steps given and high where ε is so large that discretisation biases it; in
   between it changes least with ε, and that is where it is closest to λ. On deep linear networks there is
   often no flat part at all at a few thousand steps (λ̂ rises through the whole grid): the flattest pair
   then marks the crossing from one bias to the other.
4. No row with a usable pair: the chains still drift at (nearly) every ε, and a lone cell that does not is
   more likely stuck (too small an ε to move in the steps given) than mixed. Then step 3 is applied to the
   cells that are healthy and mixed but drifting (the flattest pair, larger ε), with a reason that says the
   chains have not mixed and λ̂ is uncertain. With no such pair either: the largest usable ε in the
   preferred row. No usable cell: no recommendation, and a one-line ``hint`` saying what to change (every
   cell diverged: smaller ε).

nβ values are absolute (not multiples of n/log n); the default grid is (½, 1, 2)·n/log n.
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

from .errors import FastLLCError
from .llc import effective_sample_size, split_r_hat
from .sampling import SGLDConfig, wbic_nbeta

DRIFT_LIMIT = 3.0  # |drift| (a z-score) above which, with DRIFT_RELATIVE, a cell is "drifting"
DRIFT_RELATIVE = 0.1  # |drift_relative| (λ̂'s change between the fifths, relative) above which ... likewise
R_HAT_LIMIT = 1.1  # split-R̂ above which a cell is "unmixed"
AGREEMENT_SE = 2.0  # neighbouring ε agree within this many combined standard errors ...
AGREEMENT_RELATIVE = 0.05  # ... or within this fraction of λ̂
DEFAULT_NBETA_MULTIPLES = (0.5, 1.0, 2.0)  # the default nβ grid, as multiples of n/log n
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
    flags: list = field(default_factory=list)  # "diverged", "drifting", "unmixed"

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


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
    mean_traces: np.ndarray | None = field(default=None, repr=False)  # [cells, T]: healthy chains' mean loss

    @property
    def recommended_cell(self) -> CalibrationCell | None:
        return None if self.recommended is None else self.cells[self.recommended]

    def settings(self) -> dict:
        """The recommended cell's ``epsilon``, ``nbeta``, ``gamma`` as ``fastllc.estimate`` keywords."""
        cell = self.recommended_cell
        if cell is None:
            raise FastLLCError(f"no calibration cell is recommended: {self.hint or self.reason}")
        return dict(epsilon=cell.epsilon, nbeta=cell.nbeta, gamma=cell.gamma)

    def to_dict(self) -> dict:
        record = {k: v for k, v in asdict(self).items() if k not in ("cells", "mean_traces")}
        record["cells"] = [c.to_dict() for c in self.cells]
        for key, value in record.items():
            if isinstance(value, float) and not math.isfinite(value):
                record[key] = None
        return record

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def table(self) -> str:
        """The grid as aligned text (★ the recommended cell), then the reason or the hint (as
        ``GroupResults.table``: one string, a line per row)."""
        return "\n".join(format_cells([c.to_dict() for c in self.cells], self.recommended) + [
            f"recommended: {self.reason}" if self.recommended is not None else f"no recommendation: {self.hint}"])


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


def calibrate(model: torch.nn.Module, data, loss_fn=F.cross_entropy, *, epsilons, nbetas=None,
              gammas=(SGLDConfig.gamma,), chains: int = 4, steps: int = 2000, burn_in: int | None = None,
              batch_size: int | None = None, seed: int = 0, backend: str = "auto", device="cpu",
              progress: bool = False, mala: bool = False, restrict=None, **settings) -> CalibrationResult:
    """Run the grid ``epsilons`` × ``nbetas`` × ``gammas`` (``chains`` chains per cell) as one batched
    ``fastllc.estimate`` and recommend a cell by the rule in this module's docstring.

    ``nbetas``: absolute nβ values; default (½, 1, 2)·n/log n. ``gammas`` default: ``SGLDConfig``'s γ = 5.
    ``burn_in`` default: a quarter of ``steps``. ``batch_size`` default: ``SGLDConfig``'s (64), or a
    DataLoader's. ``mala=True`` records the MALA acceptance (``backend="auto"`` then picks ``generic``).
    Other ``SGLDConfig`` fields (``thin``, ``orthogonal``, ``sampler``, ``chain_loss``, ``loss_bound``) and
    ``restrict`` pass through to ``estimate``. A grid value that is not finite and > 0 (γ: ≥ 0), an empty
    axis or a repeated value is refused in one line before any work. A grid in which every cell diverges is
    not an error: the result has every cell flagged, no recommendation and a ``hint``.
    """
    from .compat.loaders import as_pair, is_loader, materialise

    epsilons = check_grid("epsilons", epsilons)
    gammas = check_grid("gammas", gammas, allow_zero=True)
    if nbetas is not None:
        nbetas = check_grid("nbetas", nbetas)
    if is_loader(data):
        batch_size = batch_size or data.batch_size
        data = materialise(data)
    n = len(as_pair(data)[1])
    default = wbic_nbeta(n)
    nbetas = nbetas or tuple(m * default for m in DEFAULT_NBETA_MULTIPLES)
    cells = [(e, b, g) for g in gammas for b in nbetas for e in epsilons]
    return run_cells(model, data, loss_fn, cells, chains=chains, steps=steps,
                     burn_in=steps // 4 if burn_in is None else burn_in, batch_size=batch_size, seed=seed,
                     backend=backend, device=device, progress=progress, mala=mala, restrict=restrict,
                     default_nbeta=default, **settings)


def run_cells(model, data, loss_fn, cells: Sequence[tuple[float, float, float]], *, chains: int,
              default_nbeta: float, config: SGLDConfig | None = None, backend="auto", device="cpu",
              progress=False, restrict=None, **settings) -> CalibrationResult:
    """The given (ε, nβ, γ) cells (absolute values, any list) as one batched estimate; the calibration
    result. ``config``: settings every cell shares (its chains, ε, nβ, γ are replaced)."""
    from .api import estimate
    from .compat.loaders import as_pair, is_loader, materialise

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
                      restrict=restrict)
    config = replace(config, batch_size=result.batch_size)
    trace = result.loss_trace.double().numpy()
    recorded = trace[:, config.burn_in + config.thin - 1 :: config.thin]
    per_chain_llc = np.array([math.nan if v is None else v for v in result.llc_per_chain])
    healthy = np.array(result.healthy, dtype=bool)
    mala = None if result.mala_trace is None else result.mala_trace.double().numpy()[:, config.burn_in:]
    measured, means = [], []
    for index, (epsilon, nbeta, gamma) in enumerate(cells):
        rows = slice(index * chains, (index + 1) * chains)
        cell = measure_cell(epsilon, nbeta, gamma, per_chain_llc[rows], healthy[rows], recorded[rows],
                            None if mala is None else mala[rows])
        measured.append(cell)
        good = trace[rows][healthy[rows]]
        means.append(good.mean(axis=0) if len(good) else np.full(trace.shape[1], math.nan))
    recommended, reason, hint = recommend([c.to_dict() for c in measured], default_nbeta)
    if hint is not None:
        warnings.warn(f"calibration: {hint}", RuntimeWarning, stacklevel=3)
    return CalibrationResult(
        cells=measured, recommended=recommended, reason=reason, hint=hint, n=n,
        default_nbeta=default_nbeta, chains=chains, steps=config.steps, burn_in=config.burn_in,
        batch_size=config.batch_size, seed=config.seed, backend=result.backend, device=result.device,
        init_loss=result.init_loss, sampling_seconds=result.sampling_seconds, mean_traces=np.array(means))


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
    """What is wrong with a cell (a dict of its measurements): "diverged", "drifting", "unmixed".

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
    return flags


def usable(cell: Mapping) -> bool:
    """No flag, and a λ̂ to use."""
    return not cell_flags(cell) and cell.get("llc_mean") is not None and math.isfinite(cell["llc_mean"])


def agree(cell: Mapping, smaller: Mapping | None) -> bool:
    """Both usable and λ̂ within AGREEMENT_SE combined standard errors or AGREEMENT_RELATIVE of λ̂."""
    if smaller is None or not (usable(cell) and usable(smaller)):
        return False
    difference = abs(cell["llc_mean"] - smaller["llc_mean"])
    ses = [s for s in (cell.get("llc_se"), smaller.get("llc_se")) if s is not None and math.isfinite(s)]
    combined = math.sqrt(sum(s * s for s in ses)) if len(ses) == 2 else 0.0
    return difference <= max(AGREEMENT_SE * combined, AGREEMENT_RELATIVE * abs(cell["llc_mean"]))


def smaller_neighbours(cells: Sequence[Mapping]) -> list[int | None]:
    """For each cell, the index of the cell with the next smaller ε at the same nβ and γ (None: smallest)."""
    rows: dict = {}
    for index, c in enumerate(cells):
        rows.setdefault((c["nbeta"], c["gamma"]), []).append(index)
    neighbour: list[int | None] = [None] * len(cells)
    for members in rows.values():
        ordered = sorted(members, key=lambda i: cells[i]["epsilon"])
        for lower, upper in zip(ordered, ordered[1:]):
            neighbour[upper] = lower
    return neighbour


def recommend(cells: Sequence[Mapping], default_nbeta: float) -> tuple[int | None, str, str | None]:
    """(index of the recommended cell or None, the reason in words, a one-line hint when None).

    ``cells``: dicts with epsilon, nbeta, gamma, llc_mean, llc_se, healthy_fraction, drift and
    drift_relative (or the older records' tenth means), r_hat. The rule is the module docstring's."""
    if not cells:
        return None, "no cells", "the grid is empty"
    below = smaller_neighbours(cells)
    pairs = [i for i, c in enumerate(cells) if below[i] is not None and usable(c) and usable(cells[below[i]])]
    where = (f"the row nearest the default nβ = n/log n = {default_nbeta:.4g}, then of the smallest γ, with "
             "usable neighbours")
    stationary = (f"every chain healthy, stationary (no |drift| > {DRIFT_LIMIT:g} se with λ̂ moving more than "
                  f"{DRIFT_RELATIVE:.0%}), split-R̂ ≤ {R_HAT_LIMIT}")

    def row_preference(i):
        c = cells[i]
        return (round(abs(math.log(c["nbeta"] / default_nbeta)), 9), c["gamma"])

    if pairs:
        row = row_preference(min(pairs, key=row_preference))
        in_row = [i for i in pairs if row_preference(i) == row]
        agreeing = [i for i in in_row if agree(cells[i], cells[below[i]])]
        best = (max(agreeing, key=lambda i: cells[i]["epsilon"]) if agreeing
                else flattest_within_noise(cells, below, in_row))
        c, lower = cells[best], cells[below[best]]
        head = f"ε = {c['epsilon']:g}, nβ = {c['nbeta']:g}, γ = {c['gamma']:g}: {stationary}; "
        if agreeing:
            return best, head + (f"λ̂ = {c['llc_mean']:.4g} agrees with {lower['llc_mean']:.4g} at the next smaller "
                                 f"ε = {lower['epsilon']:g} (the plateau's top in {where})"), None
        return best, head + (f"no plateau evidence (no neighbouring ε agree): λ̂ is flattest (within the noise), "
                             f"{relative_step(c, lower):.0%}, from ε = {lower['epsilon']:g} ({lower['llc_mean']:.4g}) "
                             f"to here ({c['llc_mean']:.4g}), in {where}; widen the grid or run more steps to "
                             "confirm"), None
    moving = [i for i, c in enumerate(cells) if below[i] is not None and healthy_and_mixed(c)
              and healthy_and_mixed(cells[below[i]])]
    if moving:  # every usable cell is alone: the chains still drift at most ε, the few that do not are stuck
        row = row_preference(min(moving, key=row_preference))
        best = flattest_within_noise(cells, below, [i for i in moving if row_preference(i) == row])
        c, lower = cells[best], cells[below[best]]
        return best, (f"ε = {c['epsilon']:g}, nβ = {c['nbeta']:g}, γ = {c['gamma']:g}: every chain healthy and "
                      f"split-R̂ ≤ {R_HAT_LIMIT}, but the chains still drift at nearly every ε (not mixed in "
                      f"the steps given: λ̂ is uncertain): λ̂ is flattest (within the noise), "
                      f"{relative_step(c, lower):.0%}, from "
                      f"ε = {lower['epsilon']:g} ({lower['llc_mean']:.4g}) to here ({c['llc_mean']:.4g}), in {where}; "
                      "run more steps to confirm"), None
    candidates = [i for i, c in enumerate(cells) if usable(c)]
    if candidates:
        best = min(candidates, key=lambda i: (row_preference(i), -cells[i]["epsilon"]))
        c = cells[best]
        return best, (f"ε = {c['epsilon']:g}, nβ = {c['nbeta']:g}, γ = {c['gamma']:g}: {stationary}, but no "
                      "neighbouring ε is usable (no plateau evidence): the largest usable ε nearest the default "
                      "nβ; widen the grid or run more steps to confirm"), None
    if all(c["healthy_fraction"] == 0 for c in cells):
        hint = (f"every cell diverged (no chain stayed finite and below the loss bound): try smaller epsilons, "
                f"below {min(c['epsilon'] for c in cells):g}")
    elif all("diverged" in cell_flags(c) for c in cells):
        hint = f"every cell had diverging chains: try smaller epsilons, below {min(c['epsilon'] for c in cells):g}"
    else:
        hint = ("no cell is both healthy and stationary (drifting or unmixed chains): run more steps or a larger "
                "burn-in, or try larger epsilons if the smallest ones drift")
    return None, "no cell is usable", hint


def healthy_and_mixed(cell: Mapping) -> bool:
    """Usable but for drift: every chain healthy, split-R̂ within the limit, a λ̂."""
    return not set(cell_flags(cell)) - {"drifting"} and cell.get("llc_mean") is not None and math.isfinite(
        cell["llc_mean"])


def flattest_within_noise(cells: Sequence[Mapping], below: Sequence[int | None], pairs: Sequence[int]) -> int:
    """Of the pairs (each named by its larger-ε cell), the largest ε among those whose relative step is within
    two of its standard errors of the flattest pair's: flat within the noise, then the best mixed."""
    def step(i):
        return relative_step(cells[i], cells[below[i]])

    def noise(i):
        ses = [cells[j].get("llc_se") for j in (i, below[i])]
        if any(se is None or not math.isfinite(se) for se in ses):
            return 0.0
        mean = abs(cells[i]["llc_mean"] + cells[below[i]]["llc_mean"]) / 2
        return math.sqrt(ses[0] ** 2 + ses[1] ** 2) / max(mean, 1e-300)

    flattest = min(pairs, key=step)
    bound = step(flattest) + 2 * noise(flattest)
    return max((i for i in pairs if step(i) <= bound), key=lambda i: cells[i]["epsilon"])


def relative_step(cell: Mapping, smaller: Mapping) -> float:
    """|Δλ̂| between neighbouring ε relative to their mean λ̂ (how flat λ̂(ε) is there)."""
    return abs(cell["llc_mean"] - smaller["llc_mean"]) / max(abs(cell["llc_mean"] + smaller["llc_mean"]) / 2, 1e-300)
