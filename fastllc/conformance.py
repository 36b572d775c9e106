"""Every backend follows the reference: one check per backend, capability and device.

A check runs a backend and the ``reference`` backend (on the CPU) on one small problem with the *same*
``InjectedRandomness`` (every chain's minibatches and noise, step by step) and compares their final weights
parameter by parameter, their loss traces and L_n(w*), with one tolerance per dtype (``TOLERANCE``, derived
below). The variants (``VARIANTS``) follow the capabilities a backend has (``fastllc/backends/__init__.py``):
plain SGLD and the orthogonal restriction for every backend; a weight mask, one for all chains or one per chain
(``restrict``); the study's chain loss (``published_chain_loss``); several starting points in one batch, each
against that start alone on the reference (``stacked_starts``); every sampler of ``sampling/samplers/`` other
than SGLD, as its ``example``, alone and with a mask per chain (its name, or ``samplers``); the MALA acceptance
against its formula along the reference's own path (``mala``); a capability no variant compares is listed
with the reason (``NOT_COMPARED``). A backend is checked on the first workload its ``supports`` accepts
(``WORKLOADS``): a module that is not the study's MLP (``AnyModule``: the backends that take any module), the
study's MLP, a one-block GPT-2 as ``fastllc.lm`` samples it; each at initialisation, where gradients are large.

Used by tests/test_conformance.py (every backend on the CPU, Triton in its interpreter), by backend tests for
their own dimensions (native's builds, generic's traced replay, shapes), and by ``python -m fastllc.selfcheck
--gpu`` (every backend that runs on CUDA). Only the public calls are used: ``backend_module(name).sample``,
``.sample_starts``, ``.DEVICES``, ``.supports``, ``with_capabilities``, ``SGLDConfig``, ``InjectedRandomness``.

Tolerance. Both sides compute the same update from the same draws in float32 and differ only in rounding: the
order of their sums (batched matmuls, fused kernels, cuBLAS, FMA contraction, exp/erf within a few ulps) and how
often a step rounds each weight (once for w + Δ; twice if drift and noise are added apart). A rounding moves a
weight by at most half an ulp, so the two sides part by at most 2 ulps of a weight per step. The order of the
sums changes ∇L_m by a few units of roundoff, which the step scales by ε·nβ/2 ≤ 0.02 (ε·P·nβ/2 ≤ 0.04 for the
preconditioned samplers, run at a tenth of ε): far below an ulp of w. Over a short run the update neither
amplifies nor damps a difference much (ε/2 times γ and nβ·∇²L_m is ≪ 1), so the differences add: at most 2T
ulps after T steps. An ulp of x is at most eps·max(1, |x|) (eps = 2⁻²³ in float32; values below 1 counted at
the ulp of 1, since every step adds noise of size √ε to them). Hence one tolerance per dtype, τ = 2·T·eps, on
the relative difference |fast − reference| / max(1, |reference|) (``relative_error``); the check runs
T = ``STEPS`` = 8 steps: τ(float32) = 16·2⁻²³ = 1.9e-6. A loss is a sum of products of weights that agree to
that relative precision and is held to the same τ relative to max(1, |L|), and so is L_n(w*); the MALA
acceptance α = min(1, e^a) to τ relative to the size of the terms its exponent a is a difference of (an error
δ in a moves α by at most δ).

Measured on the development CPU (Zen 4): relative differences up to 7·eps on weights (at most 1.12 ulps a step
in runs of up to 100 steps) and 2.4·eps on losses, so τ has a margin of 2; a wrong term cannot hide under it:
in these 8 steps dropping γ moves the reference's weights by 3.4e-3 (relative), doubling nβ by 1.4e-2, the
orthogonal projection by 1.6e-2, the other chain loss by 0.15 (1,800 τ or more). The per-backend tests this
replaces stated the same count, about an ulp of 1 a step, in absolute terms: 2e-6 over 20 steps (triton),
1e-5 over 100 (generic), 5e-5 over 100 with a 5× margin (torch, native), and the selfcheck's 5e-5. τ is below
each of them for values up to 1 in magnitude (up to 5 for generic's, 26 for torch's and native's); for larger
values (weights up to 2.6 and losses up to 3 here, 5.8 and 13.8 with the published loss's confident logits) it
allows more than triton's absolute 2e-6, whose own argument (an ulp per step) undercounted their ulps.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .backends import backend_module, names, with_capabilities
from .model import ModularMLP
from .sampling import InjectedRandomness, SGLDConfig, samplers
from .sampling.config import PUBLISHED_LOSS_OFFSET
from .sampling.contract import flat_parameters, unflatten
from .sampling.starts import Start
from .tasks import make_task

REFERENCE = "reference"  # the ground truth every other backend is checked against
STEPS, CHAINS = 8, 3


def tolerance(dtype: torch.dtype = torch.float32, steps: int = STEPS) -> float:
    """τ = 2·steps·eps of ``dtype``: the largest relative difference from the reference after ``steps`` steps
    (module docstring)."""
    return 2 * steps * torch.finfo(dtype).eps


TOLERANCE = {torch.float32: tolerance(torch.float32)}  # 1.9e-6: every backend computes in float32
SHAPE = (11, 5, 13, 11)  # p, e, h, m: no power of two: every Triton tile padded, every native block a tail
PUBLISHED_SHAPE = (53, 8, 32, 64)  # the study's network
PER_CHAIN = dict(epsilon=[1e-3, 2e-3, 5e-4], gamma=[5.0, 1.0, 0.0], nbeta=[10.0, 20.0, 30.0])  # ε·nβ/2 ≤ 0.02
CONFIDENT = 20.0  # published chain loss: output weights × 20, so that some p_y < 1e-6, where the two losses part
MOVED = 1e-2  # the reference chains must travel this far from w*, or the comparison says nothing


class Nonconformance(AssertionError):
    """A backend broke a rule without tolerance (weights outside a mask moved, a shape), or the comparison
    would say nothing (the chains did not move)."""


@dataclass(frozen=True)
class Variant:
    needs: frozenset  # capabilities a backend must have to be checked on it (a sampler's name: runs that sampler)
    settings: dict = field(default_factory=dict)  # SGLDConfig fields over PER_CHAIN's
    mask: str | None = None  # restrict=: "shared", one mask [d], or "per_chain", one row per chain [C, d]
    sampler: str | None = None  # a sampler of sampling/samplers/ other than sgld, run as its ``example``


_ORTHOGONAL = {"orthogonal": True}
# ε ten times smaller with a preconditioner (RMSProp's example: P ≤ 1/δ = 20): ε·P·nβ/2 ≤ 0.04 stays ≪ 1
_PRECONDITIONED = {"epsilon": [e / 10 for e in PER_CHAIN["epsilon"]], **_ORTHOGONAL}


def _variants() -> dict[str, Variant]:
    """Plain SGLD and the orthogonal restriction; a mask for all chains or one per chain; the published chain loss;
    several starts in one batch; every other sampler, alone and with a mask per chain; MALA."""
    found = {
        "sgld": Variant(frozenset()),
        "orthogonal": Variant(frozenset(), _ORTHOGONAL),
        "restrict": Variant(frozenset({"restrict"}), _ORTHOGONAL, "shared"),
        "restrict_per_chain": Variant(frozenset({"restrict"}), _ORTHOGONAL, "per_chain"),
        "published_chain_loss": Variant(frozenset({"published_chain_loss"}),
                                        {"chain_loss": "published", **_ORTHOGONAL}),
        "stacked_starts": Variant(frozenset({"stacked_starts"}), _ORTHOGONAL),
    }
    for name in samplers.names():
        if name != "sgld":
            found[name] = Variant(frozenset({name}), _PRECONDITIONED, sampler=name)
            found[f"{name}_restrict"] = Variant(frozenset({name, "restrict"}), _PRECONDITIONED, "per_chain", name)
    found["mala"] = Variant(frozenset({"mala"}), {"mala": True})
    return found


VARIANTS = _variants()
# Capabilities no variant compares with the reference, and why (a capability in neither is a test failure)
NOT_COMPARED = {
    "samplers": "the samplers themselves: each has its variants above",
    "observe": "probe losses recorded at the draws, which the reference does not record: tests/test_observables.py",
}


def subjects() -> tuple[str, ...]:
    """Every backend but the reference."""
    return tuple(name for name in names() if name != REFERENCE)


def variants(backend: str) -> tuple[str, ...]:
    """The variants ``backend`` is checked on: the plain ones and those its capabilities allow (the registry's
    ``with_capabilities``: a backend with ``samplers`` runs every sampler)."""
    return tuple(name for name, variant in VARIANTS.items() if backend in with_capabilities(variant.needs))


def runs_on(backend: str, device: str) -> bool:
    """Whether ``backend`` is checked on ``device``: a device it declares; on the CPU every backend (one that
    runs only on CUDA runs there in an interpreter, for tests: triton with TRITON_INTERPRET=1)."""
    return device == "cpu" or device in backend_module(backend).DEVICES


@dataclass(frozen=True)
class Case:
    backend: str
    variant: str
    device: str = "cpu"
    shape: tuple[int, int, int, int] = SHAPE
    workload: str | None = None  # a key of WORKLOADS; None: the first the backend supports (``workload``)

    @property
    def name(self) -> str:
        p, e, h, m = self.shape
        on = "" if self.workload is None else f" on {self.workload}"
        return (f"{self.backend} vs reference, {self.variant}{on} (p={p} e={e} h={h} m={m}, {CHAINS} chains x "
                f"{STEPS} steps, {self.device})")


def cases(device: str = "cpu", backends=None) -> list[Case]:
    """Every (backend, variant) checked on ``device``, of ``backends`` (default: every backend but the reference)."""
    return [Case(b, v, device) for b in (backends or subjects()) if runs_on(b, device) for v in variants(b)]


def relative_error(fast: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """max |fast − ref| / max(1, |scale|) (scale: ``ref``), in float64; inf where either is NaN or inf."""
    fast, ref = torch.as_tensor(fast).cpu().double(), torch.as_tensor(ref).cpu().double()
    if fast.shape != ref.shape:
        raise Nonconformance(f"shape {tuple(fast.shape)}, the reference's {tuple(ref.shape)}")
    if not fast.numel():
        return 0.0
    scale = ref.abs() if scale is None else torch.as_tensor(scale).double().abs()
    worst = float(((fast - ref).abs() / scale.clamp(min=1.0)).max())
    return worst if math.isfinite(worst) else math.inf


@dataclass
class Outcome:
    """Relative differences from the reference (``relative_error``), to be at most ``TOLERANCE``."""

    weights: float
    losses: float
    acceptance: float = 0.0  # mala only

    @property
    def error(self) -> float:
        return max(self.weights, self.losses, self.acceptance)

    def passed(self, dtype: torch.dtype = torch.float32) -> bool:
        return self.error <= TOLERANCE[dtype]


def differences(fast, ref, steps: int = STEPS) -> Outcome:
    """Final weights and loss traces of two ``Samples`` of a ``steps``-step run, relative (``relative_error``)."""
    if ref.loss_trace.shape[-1] != steps:
        raise Nonconformance(f"a run of {ref.loss_trace.shape[-1]} steps compared as one of {steps}")
    return Outcome(relative_error(fast.final_params, ref.final_params),
                   relative_error(fast.loss_trace, ref.loss_trace))


def assert_follows(fast, ref, steps: int, dtype: torch.dtype = torch.float32) -> Outcome:
    """``differences`` within ``tolerance(dtype, steps)``, else an AssertionError saying by how much."""
    outcome, bound = differences(fast, ref, steps), tolerance(dtype, steps)
    if not outcome.error <= bound:
        raise AssertionError(f"{outcome} exceeds τ = {bound:.3g} (2·{steps} steps·eps)")
    return outcome


class AnyModule(nn.Module):
    """A classifier of pairs that is not the study's MLP, for the backends that take any module: an embedding of
    both operands, one linear map of the two, LayerNorm, tanh and an output layer (``unembed``, as the study's
    MLP names its own)."""

    def __init__(self, p: int, embed: int, hidden: int):
        super().__init__()
        self.embed = nn.Embedding(p, embed)
        self.hidden = nn.Linear(2 * embed, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.unembed = nn.Linear(hidden, p)

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        return self.unembed(torch.tanh(self.norm(self.hidden(self.embed(pairs).flatten(1)))))


class Unavailable(Exception):
    """A workload needs a package this machine lacks (an extra of fastllc)."""


@dataclass
class Problem:
    """A model at initialisation (large gradients: a demanding comparison), its data and loss."""

    model: nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor
    loss_fn: Callable = F.cross_entropy

    @property
    def w_star(self) -> torch.Tensor:
        return flat_parameters(self.model)[2]


def _addition(shape, kind) -> Problem:
    p, e, h, _ = shape
    pairs, labels = make_task(p, "add", seed=0).train_data()
    return Problem(kind(p, e, h), pairs, labels)


def _causal_lm(shape) -> Problem:
    """A one-block GPT-2 (vocabulary p, width e, MLP width h, dropout off) on random sequences of 6 tokens, 4m of
    them, as ``fastllc.lm`` samples it (``CausalLM``, ``next_token_loss``)."""
    try:
        import transformers
        from .lm import CausalLM, next_token_loss, token_data
    except ImportError:
        raise Unavailable("transformers is an extra: pip install -e '.[lm]' (or '.[dev]')") from None
    p, e, h, m = shape
    config = transformers.GPT2Config(n_layer=1, n_head=1, n_embd=e, n_inner=h, vocab_size=p, n_positions=6,
                                     bos_token_id=0, eos_token_id=0)
    model = CausalLM(transformers.GPT2LMHeadModel(config).eval())
    tokens = torch.randint(p, (4 * m, 6), generator=torch.Generator().manual_seed(0))
    return Problem(model, *token_data(tokens, vocab_size=p).pair, next_token_loss)


# What a backend is checked on: the first of these its ``supports`` accepts. The backends that take any module
# get a module that is not the study's MLP; the others the study's MLP, or a causal LM.
WORKLOADS = {
    "any_module": lambda shape: _addition(shape, AnyModule),
    "study_mlp": lambda shape: _addition(shape, ModularMLP),
    "causal_lm": _causal_lm,
}


@functools.lru_cache(maxsize=None)
def workload(backend: str, device: str) -> str:
    """The workload ``backend`` is checked on: the first it ``supports`` on ``device`` (or, for a device it does
    not declare, on its first declared one: triton's interpreter on the CPU runs what it runs on CUDA)."""
    module = backend_module(backend)
    where = torch.device(device if device in module.DEVICES else module.DEVICES[0])
    for kind, build in WORKLOADS.items():
        probe = build((3, 2, 2, 1))
        if module.supports(probe.model, probe.loss_fn, where):
            return kind
    raise Nonconformance(f"the {backend} backend supports none of the workloads {', '.join(WORKLOADS)} on {where}")


def problem(case: Case, seed: int = 0) -> Problem:
    """The problem ``case`` is checked on (``workload``); confident logits for the published chain loss."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        prob = WORKLOADS[case.workload or workload(case.backend, case.device)](case.shape)
    if VARIANTS[case.variant].settings.get("chain_loss") == "published":
        with torch.no_grad():
            prob.model.unembed.weight.mul_(CONFIDENT)
            p_y = F.softmax(prob.model(prob.inputs), -1).gather(-1, prob.targets.view(-1, 1))
        if not bool((p_y < PUBLISHED_LOSS_OFFSET).any()):
            raise Nonconformance("no example has p_y < 1e-6: the published chain loss would be cross-entropy")
    return prob


def config(case: Case, d: int, chains: int = CHAINS) -> SGLDConfig:
    """The settings of ``case`` for a model of d weights: PER_CHAIN's, the variant's, its sampler's ``example``."""
    variant = VARIANTS[case.variant]
    sampler = {} if variant.sampler is None else {"sampler": samplers.sampler_class(variant.sampler).example(d)}
    return SGLDConfig(chains=chains, steps=STEPS, batch_size=case.shape[3],
                      **{**PER_CHAIN, **variant.settings, **sampler})


def mask(variant: str, d: int, chains: int = CHAINS) -> torch.Tensor | None:
    """The weights a restricted variant samples: about 30% of every parameter, one row or one per chain."""
    kind, gen = VARIANTS[variant].mask, torch.Generator().manual_seed(1)
    if kind is None:
        return None
    return torch.rand(d if kind == "shared" else (chains, d), generator=gen) < 0.3


def _injected(chains: int, prob: Problem, case: Case) -> InjectedRandomness:
    return InjectedRandomness.seeded(chains, STEPS, len(prob.targets), case.shape[3], prob.w_star.numel(), seed=2)


def _rows(noise: InjectedRandomness, rows: slice) -> InjectedRandomness:
    return InjectedRandomness(noise.indices[rows], noise.noise[rows])


def _against(fast, ref, prob: Problem) -> Outcome:
    """``differences``, with L_n(w*) against one forward pass computed here (the backends share a function for
    it: this one is independent); the reference chains must have moved."""
    if (ref.final_params - prob.w_star).abs().max() < MOVED:
        raise Nonconformance("the reference chains did not move: the comparison would say nothing")
    with torch.no_grad():
        init_loss = prob.loss_fn(prob.model(prob.inputs), prob.targets)
    outcome = differences(fast, ref)
    outcome.losses = max(outcome.losses, relative_error(torch.tensor(fast.init_loss), init_loss))
    return outcome


def _require_fixed(samples, w_star: torch.Tensor, keep: torch.Tensor) -> None:
    """Weights outside the mask stay at w* bit for bit, in every chain."""
    finals = samples.final_params.cpu()
    rows = keep.expand(finals.shape)
    if not torch.equal(finals[~rows], w_star.expand_as(finals)[~rows]):
        raise Nonconformance("a weight outside the restriction moved from w*")


def check(case: Case, **options) -> Outcome:
    """Run ``case``: its differences from the reference (``Outcome``), or ``Nonconformance``. ``options`` go to
    the backend's ``sample`` or ``sample_starts`` only (a backend's own dimensions: native's ``variant=``)."""
    if "stacked_starts" in VARIANTS[case.variant].needs:
        return _check_stacked_starts(case, options)
    prob = problem(case)
    settings, noise = config(case, prob.w_star.numel()), _injected(CHAINS, prob, case)
    keep = mask(case.variant, prob.w_star.numel())
    restrict = {} if keep is None else {"restrict": keep}
    ref = backend_module(REFERENCE).sample(prob.model, prob.inputs, prob.targets, prob.loss_fn, settings,
                                           randomness=noise, **restrict)
    fast = backend_module(case.backend).sample(prob.model, prob.inputs, prob.targets, prob.loss_fn, settings,
                                               randomness=noise, device=case.device, **restrict, **options)
    outcome = _against(fast, ref, prob)
    if keep is not None:
        _require_fixed(fast, prob.w_star, keep)
    if settings.mala:
        outcome.acceptance = _acceptance_error(fast, prob, settings, noise)
    return outcome


def _check_stacked_starts(case: Case, options: dict) -> Outcome:
    """Two starts (two networks of one architecture) in one batch: start s's chains are global chains
    s·C .. s·C + C − 1 and read those rows of the draws, as that start alone on the reference does."""
    problems = [problem(case, seed) for seed in (0, 1)]
    settings = config(case, problems[0].w_star.numel())
    noise = _injected(2 * CHAINS, problems[0], case)
    together = backend_module(case.backend).sample_starts([Start(p.model, p.inputs, p.targets) for p in problems],
                                                          settings, randomness=noise, device=case.device, **options)
    outcomes = []
    for s, (prob, fast) in enumerate(zip(problems, together, strict=True)):
        alone = backend_module(REFERENCE).sample(prob.model, prob.inputs, prob.targets, prob.loss_fn, settings,
                                                 randomness=_rows(noise, slice(s * CHAINS, (s + 1) * CHAINS)))
        outcomes.append(_against(fast, alone, prob))
        if fast.chains_in_batch != 2 * CHAINS:
            raise Nonconformance(f"start {s}: {fast.chains_in_batch} chains in its batch, not {2 * CHAINS}")
    return Outcome(max(o.weights for o in outcomes), max(o.losses for o in outcomes))


def _reference_path(prob: Problem, settings: SGLDConfig, noise: InjectedRandomness) -> torch.Tensor:
    """w_t of every chain for t = 0 .. T − 1 [C, T, d], each from a reference run of t steps."""
    reference, path = backend_module(REFERENCE), [prob.w_star.expand(settings.chains, -1)]
    for t in range(1, settings.steps):
        prefix = SGLDConfig(**{**settings.to_dict(), "steps": t})
        run = reference.sample(prob.model, prob.inputs, prob.targets, prob.loss_fn, prefix,
                               randomness=InjectedRandomness(noise.indices[:, :t], noise.noise[:, :t]))
        path.append(run.final_params)
    return torch.stack(path, 1)


def mala_acceptance(prob: Problem, settings: SGLDConfig, noise: InjectedRandomness, path: torch.Tensor):
    """The MALA acceptance of every step t − 1 → t along ``path`` [C, T, d], in float64, and the size of the
    terms its exponent is a difference of (both [C, T − 1]): α = min(1, exp(U(w) − U(w') + log q(w | w') −
    log q(w' | w))), U = nβ·L_m + γ/2·‖w − w*‖² with each end on its own step's minibatch, q the SGLD proposal
    N(w − (ε/2)∇U(w), ε·I)."""
    names_, shapes, _ = flat_parameters(prob.model)
    model, w_star = copy.deepcopy(prob.model).double(), prob.w_star.double()
    chains, steps = path.shape[:2]
    eps, gamma, nbeta = (torch.as_tensor(getattr(settings, k), dtype=torch.float64).expand(chains)
                         for k in ("epsilon", "gamma", "nbeta"))

    def potential(c, t):
        w = path[c, t].double().requires_grad_(True)
        idx = noise.indices[c, t]
        outputs = torch.func.functional_call(model, unflatten(w, names_, shapes), (prob.inputs[idx],))
        u = nbeta[c] * prob.loss_fn(outputs, prob.targets[idx]) + gamma[c] / 2 * (w - w_star).pow(2).sum()
        return u.item(), torch.autograd.grad(u, w)[0], w.detach()

    acceptance, size = torch.empty(chains, steps - 1, dtype=torch.float64), torch.empty(chains, steps - 1)
    for c in range(chains):
        u0, g0, w0 = potential(c, 0)
        for t in range(1, steps):
            u1, g1, w1 = potential(c, t)
            half = eps[c] / 2
            forward = (w1 - w0 + half * g0).pow(2).sum() / (2 * eps[c])
            backward = (w0 - w1 + half * g1).pow(2).sum() / (2 * eps[c])
            acceptance[c, t - 1] = math.exp(min(0.0, u0 - u1 + float(forward - backward)))
            size[c, t - 1] = abs(u0) + abs(u1) + float(forward + backward)
            u0, g0, w0 = u1, g1, w1
    return acceptance, size


def _acceptance_error(fast, prob: Problem, settings: SGLDConfig, noise: InjectedRandomness) -> float:
    if fast.mala_acceptance is None:
        raise Nonconformance("mala=True recorded no acceptance")
    expected, size = mala_acceptance(prob, settings, noise, _reference_path(prob, settings, noise))
    if not bool((expected < 0.999).any()):
        raise Nonconformance("every step was accepted: the acceptance comparison would say nothing")
    return relative_error(fast.mala_acceptance, expected, scale=size)
