"""Susceptibilities of every weight restriction to every probe set, per token, per sequence and per set.

Definition (Baker, Wang, Hoogland, Murfet 2025, "Structural inference: interpreting small language models with
susceptibilities", arXiv:2504.18274, §3 and App. C.4). Shift the data distribution q toward a probe distribution
q', q_h = (1 − h)·q + h·q'. For an observable φ of the weights, under the localised tempered posterior
(∝ exp(−nβ·L_q(w) − γ/2·‖w − w*‖²)), the fluctuation–dissipation identity gives
    ∂/∂h E_h[φ] |_{h=0} = −nβ · Cov(φ, L_{q'} − L_q),      and   χ := −Cov(φ, L_{q'} − L_q)
(the susceptibility up to the factor nβ), which splits over the probe's tokens xy: χ_xy = −Cov(φ, ℓ_xy − L_q).
The component observable of a restriction C is φ_C = L_q(w) − L_q(w*) sampled with only C's weights moving (its
chain group). Here L_q(w) is m_task, the mean loss of the probe set drawn from the sampling distribution (the
``task``), and L_q(w*) the run's L_n(w*) (``init_loss``).

Sign convention (the paper's and devinterp 2.0.1's, without nβ): χ < 0 means that up-weighting the probe lowers
the component's expected loss E[φ_C]; χ > 0 that it raises it. χ of the task set itself is 0 (it is left out
unless ``include_task``).

Estimators over a restriction's draws (all its healthy chains stacked; x a probe element's loss, m = m_task):
    "covariance" (default): χ̂ = mean(φ·(m − x)) − mean(φ)·mean(m − x) = −Cov_g(m, x − m)   (φ's constant drops)
    "devinterp": devinterp 2.0.1's ``compute_susceptibilities`` (devinterp/slt/susceptibilities.py), which centres
                 on the FULL restriction's mean difference instead of the group's own:
                 χ̂ = mean_g(φ·m) − mean_g(φ·x) − mean_g(φ)·(mean_full(m) − mean_full(x)).
The two agree for the full restriction; for another one the devinterp estimator adds
E_g[φ]·(E_g[m − x] − E_full[m − x]), which depends on L_n(w*). χ is linear in the observable, so a sequence's χ is
the weighted mean of its tokens' and a probe set's the mean of its elements'. Standard errors: the jackknife over
chains (the estimator without each chain in turn, ``moments.jackknife_se``), for the devinterp estimator of a
restriction plus the jackknife over the full run's chains (its centre).

Token classes (``classes=``, ``classes.py``): χ of a class is the χ of its tokens' mean loss, the weighted mean of
their per-token χ (the estimator is linear in the observable), [G, C] in ``Susceptibilities.classes``; its standard
error is the same jackknife applied to that mean (each leave-one-chain-out χ aggregated over the class, then
``jackknife_se``), so the correlations between a class's tokens are in it, as they are in a probe set's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import FastLLCError
from ..validate import check_choice
from .classes import class_weights, token_classes
from .moments import jackknife_se, leave_one_out, pooled
from .run import ObservedRun

ESTIMATORS = ("covariance", "devinterp")


@dataclass
class Susceptibilities:
    """χ and its standard error per restriction × (token [N, K] | example [N] | probe set [O])."""

    restrictions: list
    probe_sets: list  # the probe sets' names (columns of ``sets``)
    task: str
    estimator: str
    token: torch.Tensor  # [G, N, K]; NaN at elements that do not count (weight 0)
    token_se: torch.Tensor
    example: torch.Tensor  # [G, N]
    example_se: torch.Tensor
    sets: torch.Tensor  # [G, O]
    sets_se: torch.Tensor
    chains: list  # healthy chains per restriction
    offsets: tuple  # the probe sets' example ranges
    classes: torch.Tensor | None = None  # [G, C] per token class (``classes=``), NaN for a class with no token
    classes_se: torch.Tensor | None = None
    class_names: list | None = None
    class_tokens: list | None = None  # tokens per class

    def columns(self, by: str = "set", include_task: bool = False) -> tuple:
        """(column names, χ [G, c], se [G, c]) of the table or heatmap: probe sets (the task's only with
        ``include_task``) or token classes."""
        check_choice("by", by, ("set", "class"))
        if by == "class":
            if self.classes is None:
                raise FastLLCError("no token classes: compute_susceptibilities(run, task, classes=...) gives them")
            return list(self.class_names), self.classes, self.classes_se
        keep = [o for o, name in enumerate(self.probe_sets) if include_task or name != self.task]
        return [self.probe_sets[o] for o in keep], self.sets[:, keep], self.sets_se[:, keep]

    def table(self, include_task: bool = False, by: str = "set") -> str:
        """χ ± se, one row per restriction, one column per probe set (``by="class"``: per token class)."""
        names, values, errors = self.columns(by, include_task)
        rows = ["restriction".ljust(14) + "".join(name.rjust(24) for name in names)]
        for g, name in enumerate(self.restrictions):
            cells = "".join(f"{values[g, c]:+.4g} ± {errors[g, c]:.2g}".rjust(24) for c in range(len(names)))
            rows.append(str(name).ljust(14) + cells)
        return "\n".join(rows)

    def to_dict(self) -> dict:
        return {"task": self.task, "estimator": self.estimator, "chains": self.chains,
                "susceptibility": {r: {p: float(self.sets[g, o]) for o, p in enumerate(self.probe_sets)}
                                   for g, r in enumerate(self.restrictions)},
                "se": {r: {p: float(self.sets_se[g, o]) for o, p in enumerate(self.probe_sets)}
                       for g, r in enumerate(self.restrictions)}}


def _means(sums: dict, task: int) -> tuple:
    """(E[m_task], E[m_task²], E[x], E[m_task·x]) of per-chain or pooled sums (leading dims kept)."""
    n = sums["count"]
    n_x = n.reshape(*n.shape, 1, 1)
    return (sums["m"][..., task] / n, sums["mm"][..., task, task] / n, sums["x"] / n_x,
            sums["mx"][..., task, :, :] / n_x)


def _chi(sums: dict, task: int, estimator: str, init_loss: float, full_difference) -> torch.Tensor:
    """χ per token [..., N, K] from sums (module docstring); ``full_difference``: E_full[m − x] [N, K]."""
    em, emm, ex, emx = _means(sums, task)
    em_, emm_ = em[..., None, None], emm[..., None, None]
    if estimator == "covariance":
        return (emm_ - em_ * em_) - (emx - em_ * ex)
    e_phi_m = emm_ - init_loss * em_
    e_phi_x = emx - init_loss * ex
    return e_phi_m - e_phi_x - (em_ - init_loss) * full_difference


def compute_susceptibilities(run: ObservedRun, task: str, *, estimator: str = "covariance", full: str = "full",
                             classes=None) -> Susceptibilities:
    """χ of every restriction of ``run`` to every probe set, with ``task`` the probe set drawn from the sampling
    distribution (module docstring). ``estimator="devinterp"`` needs the unrestricted group, named ``full``.
    ``classes``: token classes (``classes.token_classes``' arguments, or its ``TokenClasses``): χ per restriction ×
    class as well, the χ of each class's mean token loss with its jackknife standard error (module docstring)."""
    check_choice("estimator", estimator, ESTIMATORS)
    run.probes.rows(task)  # a one-line error for an unknown name
    t = run.probes.names.index(task)
    if estimator == "devinterp" and full not in run.groups:
        raise FastLLCError(f"the devinterp estimator centres on the unrestricted run: name it {full!r} in "
                           "restrictions (None selects every weight)")
    spec = None if classes is None else token_classes(classes)
    class_w, class_tokens = (None, None) if spec is None else class_weights(spec, run.probes, task)
    views = _views(run.probes, class_w)
    out = {key: [] for name in views for key in (name, name + "_se")}
    chains = []
    for name in run.groups:
        index = run.chains(name)
        if len(index) == 0:
            raise FastLLCError(f"restriction {name!r} has no healthy chain: lower epsilon or nbeta")
        value, jackknives = _restriction(run, name, t, estimator, full)
        for key, view in views.items():
            out[key].append(view(value))
            out[key + "_se"].append(sum(jackknife_se(view(j)) ** 2 for j in jackknives).sqrt())
        chains.append(len(index))
    stacked = {key: torch.stack(values) for key, values in out.items()}
    for key in ("token", "token_se"):  # an element that does not count (a masked token) has no χ
        stacked[key][:, run.probes.weights == 0] = math.nan
    named = {} if spec is None else {"class_names": list(spec.names), "class_tokens": class_tokens.tolist()}
    return Susceptibilities(list(run.groups), list(run.probes.names), task, estimator, chains=chains,
                            offsets=run.probes.offsets, **stacked, **named)


def _views(probes, class_w) -> dict:
    """{result field: per-token χ [..., N, K] → that field's values}: every view is linear in the tokens' χ."""
    set_w, example_w = probes.set_weights(), probes.example_weights()
    views = {"token": lambda a: a, "example": lambda a: (a * example_w).sum(-1),
             "sets": lambda a: torch.einsum("...nk,onk->...o", a, set_w)}
    if class_w is not None:
        views["classes"] = lambda a: torch.einsum("...nk,cnk->...c", a, class_w)
    return views


def _difference(sums: dict, task: int) -> torch.Tensor:
    """E[m_task − x] [..., N, K] of pooled or leave-one-out sums: the devinterp estimator's centre."""
    em, _, ex, _ = _means(sums, task)
    return em[..., None, None] - ex


def _restriction(run, name: str, task: int, estimator: str, full: str) -> tuple:
    """(χ [N, K], [leave-one-chain-out χ [c, N, K] per independent set of chains]) of one restriction. The
    standard error adds the jackknife variances of the independent sets: the restriction's own chains and, for
    the devinterp estimator of another restriction, the full run's chains its centre comes from."""
    sums = run.moments.chains(run.chains(name))
    if estimator == "covariance":
        return (_chi(pooled(sums), task, estimator, run.init_loss, None),
                [_chi(leave_one_out(sums), task, estimator, run.init_loss, None)])
    full_sums = run.moments.chains(run.chains(full))
    centre = _difference(pooled(full_sums), task)
    value = _chi(pooled(sums), task, estimator, run.init_loss, centre)
    if name == full:  # the centre comes from these very chains: recomputed without each
        out = leave_one_out(sums)
        return value, [_chi(out, task, estimator, run.init_loss, _difference(out, task))]
    own = _chi(leave_one_out(sums), task, estimator, run.init_loss, centre)
    moved = _chi(pooled(sums), task, estimator, run.init_loss, _difference(leave_one_out(full_sums), task))
    return value, [own, moved]


__all__ = ["ESTIMATORS", "Susceptibilities", "compute_susceptibilities"]
