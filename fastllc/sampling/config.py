"""SGLD settings shared by every backend, validated once.

ε, γ and nβ may each be a scalar or one value per chain: a calibration grid is just a batch of chains.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Sequence, Union

import torch

from ..errors import FastLLCError
from ..seeding import check_seed
from ..validate import check_bool, check_float, check_int, check_numbers
from . import samplers
from .samplers import Sampler

PerChain = Union[float, Sequence[float], torch.Tensor]
CHAIN_LOSSES = ("exact", "published")  # what ``SGLDConfig.chain_loss`` accepts
PUBLISHED_LOSS_OFFSET = 1e-6  # δ of the study's chain loss −mean log(softmax(z)_y + δ) (seed_results.json)


def wbic_nbeta(n: int) -> float:
    """nβ = n / log n for n training examples (β = 1/log n, Watanabe's WBIC temperature): fastllc's default.
    Not devinterp's default, b/log b of the batch size (``compat.devinterp.default_nbeta``, devinterp's name)."""
    if n < 2:
        raise FastLLCError(f"the default nβ = n/log n needs n >= 2 training examples, got {n}")
    return n / math.log(n)


@dataclass(frozen=True)
class SGLDConfig:
    """Settings of one LLC estimate: ``chains`` SGLD chains of ``steps`` steps each, started at w*.

    The update (Lau, Murfet, Wei 2023) is
        w ← w − (ε/2)·[γ(w − w*) + nβ·∇L_m(w)] + N(0, ε·I),
    with L_m the mean loss on a minibatch of m = ``batch_size`` examples drawn with replacement.
    ``orthogonal`` removes from every increment its component along ∇L_n(w*)/‖∇L_n(w*)‖.
    Loss is recorded at w_t before each update; the first ``burn_in`` records are dropped, and of the rest
    the estimator uses every ``thin``-th (records burn_in + thin − 1, burn_in + 2·thin − 1, ...: devinterp's
    draws with ``num_steps_bw_draws = thin``). ``mala`` asks a backend that can (``generic``) to record the
    MALA acceptance probability of every step, as devinterp's ``MalaAcceptanceRate`` defines it.

    ``sampler``: the update rule, a sampler object (``fastllc.sampling.samplers``: each module's docstring
    states its update) or the name of one: ``"sgld"`` (the update above), ``"rmsprop_sgld"`` (RMSProp-SGLD,
    exactly as devinterp 1.3.2 runs it, with α = ``rmsprop_alpha`` and δ = ``rmsprop_eps``: devinterp's
    ``alpha`` 0.99 and ``eps`` 0.1). ``orthogonal`` projects the sampler's whole increment. ``mala`` is
    plain SGLD's acceptance, so it needs ``"sgld"``.

    ``chain_loss``: the loss L_m the chains record and follow. ``"exact"`` (default): the caller's
    ``loss_fn``. ``"published"``: the published study's −mean log(softmax(z)_y + δ), δ = 1e-6
    (``PUBLISHED_LOSS_OFFSET``), defined for a cross-entropy ``loss_fn`` only. L_n(w*) stays exact in both:
    λ̂ = nβ·(mean L_m(w_t) − L_n(w*)) as the study computed it. The δ caps the loss of an example at
    −log δ ≈ 13.8 nats and scales its gradient by p_y/(p_y + δ): it matters only where chains visit
    p_y ≲ 1e-6, as memorising networks' chains do (about 1.25× higher λ̂ there; ≤ 2% on generalising ones).
    """

    chains: int = 4
    steps: int = 5000
    epsilon: PerChain = 1e-3
    gamma: PerChain = 5.0
    nbeta: PerChain | None = None  # None: n / log n
    batch_size: int = 64
    burn_in: int = 0
    orthogonal: bool = False
    seed: int = 0
    loss_bound: float | None = None  # a recorded loss above this marks a chain unhealthy; None: see llc.py
    thin: int = 1  # the estimator averages every thin-th record after burn-in
    mala: bool = False  # record the MALA acceptance probability of every step (backend generic)
    sampler: Union[str, Sampler] = "sgld"  # a sampler object or name (see above)
    rmsprop_alpha: float = 0.99  # RMSProp-SGLD: decay of the mean squared gradient V (devinterp's alpha)
    rmsprop_eps: float = 0.1  # RMSProp-SGLD: δ in P = 1/(√V + δ) (devinterp's eps)
    chain_loss: str = "exact"  # or "published" (see above)

    def validate(self) -> "SGLDConfig":
        self._check_types()
        if not 0 <= self.burn_in < self.steps:
            raise FastLLCError(f"burn-in must be in [0, steps) = [0, {self.steps}), got {self.burn_in}")
        if self.thin < 1 or self.thin > self.steps - self.burn_in:
            raise FastLLCError(f"thin must be in [1, steps − burn-in] = [1, {self.steps - self.burn_in}], "
                               f"got {self.thin}")
        check_seed(self.seed)  # the samplers' random streams key on a signed 64-bit integer
        self._values("epsilon", lambda v: v > 0, "> 0")  # as given, one value or C: not C copies of one value
        self._values("gamma", lambda v: v >= 0, ">= 0")
        if self.nbeta is not None:
            self._values("nbeta", lambda v: v > 0, "> 0")
        self._check_sampler()
        return self

    def _check_types(self) -> None:
        """Every field's type, first: a wrong one (steps=50.5, chains="2") is a one-line error naming the
        field, never a TypeError from deep inside a backend (``fastllc.validate``)."""
        for name in ("chains", "steps", "batch_size", "thin"):
            check_int(name, getattr(self, name), 1)
        check_int("burn_in", self.burn_in, 0)
        for name in ("orthogonal", "mala"):
            check_bool(name, getattr(self, name))
        for name in ("epsilon", "gamma") + (("nbeta",) if self.nbeta is not None else ()):
            check_numbers(name, getattr(self, name))
        if self.loss_bound is not None:
            check_float("loss_bound", self.loss_bound, above=0)

    def _check_sampler(self) -> None:
        alpha, eps = self.rmsprop_alpha, self.rmsprop_eps  # checked whichever sampler runs: they are fields
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and 0 < alpha < 1):
            raise FastLLCError(f"rmsprop_alpha must be in (0, 1), got {alpha}")
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
            raise FastLLCError(f"rmsprop_eps must be finite and > 0, got {eps}")
        self.sampler_object().check()
        if self.chain_loss not in CHAIN_LOSSES:
            raise FastLLCError(f"unknown chain_loss {self.chain_loss!r}; choose one of {', '.join(CHAIN_LOSSES)}")
        if self.mala and self.sampler_name != "sgld":
            raise FastLLCError(f"mala=True records plain SGLD's acceptance rate; it is not defined for "
                               f"sampler={self.sampler_name!r}: use sampler='sgld' or drop mala")

    def sampler_object(self) -> Sampler:
        """The sampler these settings run (``samplers.resolve``): what backends ask for the update."""
        return samplers.resolve(self)

    @property
    def sampler_name(self) -> str:
        """The sampler's name ("sgld", "rmsprop_sgld", ...): what job names and records carry."""
        return self.sampler.name if isinstance(self.sampler, Sampler) else self.sampler

    def needs(self) -> tuple[str, ...]:
        """The backend capabilities (``fastllc.backends``) these settings need: ``mala``, the sampler, the
        published chain loss."""
        return ((("mala",) if self.mala else ()) + ((self.sampler_name,) if self.sampler_name != "sgld" else ())
                + (("published_chain_loss",) if self.chain_loss == "published" else ()))

    def tiled(self, groups: int) -> "SGLDConfig":
        """``groups`` copies of these chains in one batch: ``chains`` × groups, ε, γ, nβ given per chain repeated
        for every group (single values as they are)."""
        return replace(self, chains=self.chains * groups, **self._edit_per_chain(lambda v: v * groups))

    def chain_range(self, lo: int, hi: int) -> "SGLDConfig":
        """Chains [lo, hi) of this batch: ε, γ, nβ given per chain sliced alike (single values as they are)."""
        return replace(self, chains=hi - lo, **self._edit_per_chain(lambda v: v[lo:hi]))

    def _edit_per_chain(self, edit) -> dict:
        """``edit`` applied to the list of each of ε, γ, nβ given per chain; single values left out."""
        out = {}
        for name in ("epsilon", "gamma", "nbeta"):
            value = getattr(self, name)
            if value is not None and torch.as_tensor(value).numel() > 1:
                out[name] = edit(torch.as_tensor(value, dtype=torch.float64).reshape(-1).tolist())
        return out

    def per_chain(self, name: str, ok=lambda v: True, rule: str = "", n: int | None = None) -> torch.Tensor:
        """The setting ``name`` as a float64 vector of length ``chains`` (checked against ``rule``)."""
        return self._values(name, ok, rule, n).expand(self.chains).clone()

    def _values(self, name: str, ok, rule: str, n: int | None = None) -> torch.Tensor:
        """The setting ``name`` as given (one value or one per chain), as float64, checked against ``rule``."""
        value = getattr(self, name)
        if value is None:
            if n is None:
                raise FastLLCError(f"{name} is not set")
            value = wbic_nbeta(n)
        vector = torch.as_tensor(value, dtype=torch.float64).reshape(-1)
        if vector.numel() not in (1, self.chains):
            raise FastLLCError(f"{name} has {vector.numel()} values for {self.chains} chains")
        bad = [v for v in vector.tolist() if not (math.isfinite(v) and ok(v))]
        if bad:
            raise FastLLCError(f"{name} must be finite and {rule}, got {bad[0]}")
        return vector

    def hyperparameters(self, n: int, samplers: Sequence[str] | None = ("sgld",)
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ε, γ, nβ) as float64 vectors of length ``chains``; nβ defaults to n/log n.

        ``samplers``: the names of the samplers the calling backend runs, None when it runs every sampler
        through the sampler's own update. Every backend asks for its coefficients here, so a fused kernel
        written for one sampler refuses another instead of silently running its own (``require_sampler``)."""
        if samplers is not None:
            require_sampler(self, samplers)
        return self.per_chain("epsilon"), self.per_chain("gamma"), self.per_chain("nbeta", n=n)

    def to_dict(self) -> dict:
        record = asdict(self)
        for key in ("epsilon", "gamma", "nbeta"):
            value = record[key]
            if isinstance(value, torch.Tensor):
                record[key] = value.tolist()
            elif isinstance(value, (list, tuple)):
                record[key] = [float(v) for v in value]
        record["sampler"] = self.sampler_name
        if isinstance(self.sampler, Sampler):  # an object's own values (a name's are the fields above)
            record["sampler_settings"] = self.sampler.settings()
        return record


def require_sampler(config: SGLDConfig, samplers: Sequence[str]) -> None:
    """Refuse ``config.sampler`` where the caller implements only ``samplers`` (one line)."""
    if config.sampler_name not in samplers:
        raise FastLLCError(f"this backend implements sampler {' and '.join(map(repr, samplers))} only, not "
                           f"{config.sampler_name!r}; use backend='auto', which picks one that has it")
