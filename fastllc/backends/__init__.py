"""The sampling backends and the registry that chooses among them by capability.

A backend is one module here, named as users name it (``--backend NAME``), that provides
    NAME            its name (the module's)
    CAPABILITIES    what it can do beyond ``sample``, as data: ``stacked_starts`` (several starting points
                    in one batch: it has ``sample_starts``), ``mala`` (records the MALA acceptance),
                    ``samplers`` (runs every sampler of ``sampling/samplers/`` through the sampler's own
                    update; without it a backend runs plain SGLD only, or the samplers it names in
                    CAPABILITIES, and ``config.hyperparameters`` refuses it any other),
                    ``restrict`` (its ``sample`` takes ``restrict=``, a bool mask over the flat weights, [d] for
                    every chain or [C, d] one row per chain, checked by ``sampling.restrict.check_mask``: only
                    those move, the others stay at w* bit for bit),
                    ``published_chain_loss`` (follows ``SGLDConfig.chain_loss="published"``)
    DEVICES         device types it runs on (the conformance checks, ``fastllc.conformance``, run it there)
    AUTO_PRIORITY   ``auto`` tries backends in increasing priority: the fastest first
    supports(model, loss_fn, device) -> bool    may ``auto`` give it this work? cheap, imports nothing heavy;
                    ``model=None`` asks about the study's MLP with cross-entropy (the CLI, before training)
    require(device, model=None, loss_fn=None)   raises the one-line FastLLCError saying why it cannot
    sample(model, inputs, targets, loss_fn, config, *, randomness=None, device="cpu", progress=False,
           init_loss=None) -> Samples     (``init_loss``: L_n(w*) when the caller knows it, recorded as given)
    sample_starts(starts, config, *, randomness=None, device="cpu", progress=False) -> list[Samples]
                    (with ``stacked_starts``; ``sampling/starts.py``)
and is tested in ``tests/test_backend_NAME.py`` and benchmarked in ``bench/test_bench_NAME.py``. Kernels
it launches live in ``fastllc/kernels/``, named after what they compute. Modules are imported only when
used, so that e.g. Triton is never loaded by a CPU run. The registry finds the modules itself (every
module of this package whose name does not start with ``_``): adding a backend is adding its module.
Nothing outside this package decides anything by a backend's name: callers state what they need
(``needs=``) and the registry finds who has it. A worked example: docs/design.md.
"""

from __future__ import annotations

import importlib
import pkgutil

from ..errors import FastLLCError
from ..sampling import samplers
from ..sampling.config import SGLDConfig
from ..sampling.contract import Samples


def names() -> tuple[str, ...]:
    """Every backend's name: the modules of this package (listed, not imported)."""
    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")))


NAMES = names()
CHOICES = ("auto", *NAMES)  # what ``--backend`` accepts
NEEDED_FOR = {  # what a caller that needs a capability is doing, for the one-line error
    "stacked_starts": "several starting points in one batch (estimate_checkpoints)",
    "mala": "mala=True (the MALA acceptance rate)",
    "samplers": "every sampler (each through its own update)",
    "restrict": "restrict= (weight-restricted sampling)",
    "published_chain_loss": "chain_loss='published' (the study's −log(p_y + 1e-6) chain loss)",
    "observe": "observe= (probe losses recorded at the draws: fastllc.observables)",
    **{name: f"sampler={name!r} ({samplers.sampler_class(name).title})" for name in samplers.names() if name != "sgld"},  # a sampler's name: runs it
}


def has(name: str, need: str) -> bool:
    """Whether backend ``name`` has capability ``need`` (a sampler's name: it runs that sampler)."""
    capabilities = backend_module(name).CAPABILITIES
    return need in capabilities or (need in samplers.names() and "samplers" in capabilities)


def _require_known(name: str) -> None:
    if name != "auto" and name not in names():
        raise FastLLCError(f"unknown backend {name!r}; choose one of {', '.join(('auto', *names()))}")


def backend_module(name: str):
    """The module implementing backend ``name``."""
    _require_known(name)
    return importlib.import_module(f"{__name__}.{name}")


def auto_order() -> list[str]:
    """Every backend's name, the fastest first (by each module's ``AUTO_PRIORITY``)."""
    return sorted(names(), key=lambda name: backend_module(name).AUTO_PRIORITY)


def with_capabilities(needs) -> list[str]:
    """Names of the backends that have every capability in ``needs``, the fastest first."""
    unknown = set(needs) - set(NEEDED_FOR)
    if unknown:  # a caller's typo, not a user's input
        raise ValueError(f"unknown capabilities {sorted(unknown)}; known: {sorted(NEEDED_FOR)}")
    return [name for name in auto_order() if all(has(name, need) for need in needs)]


def resolve_backend(name: str, device, model=None, loss_fn=None, needs=()) -> str:
    """The backend that ``name`` means, with every capability in ``needs``.

    ``auto``: the fastest such backend that supports the model, loss and device (without a model, e.g. the
    CLI before training: the study's MLP). An explicit name: checked for the capabilities and by its own
    ``require(device)`` (e.g. triton without CUDA), so that the one-line reason comes before any work.
    """
    _require_known(name)
    able = with_capabilities(needs)
    what = " and ".join(NEEDED_FOR[need] for need in needs)
    who = " or ".join(repr(n) for n in able) or "(none has it)"
    if name != "auto":
        if name not in able:  # named: those of them that run this model (without one: the study's MLP) here
            fitting = [n for n in able if backend_module(n).supports(model, loss_fn, device)]
            raise FastLLCError(f"{what} needs backend {' or '.join(map(repr, fitting)) or who}, not {name!r}")
        backend_module(name).require(device)
        return name
    for candidate in able:
        if backend_module(candidate).supports(model, loss_fn, device):
            return candidate
    raise FastLLCError(f"{what} needs backend {who}, which cannot run this model ({type(model).__name__}) "
                       f"with this loss on {device}")


def sample(model, inputs, targets, loss_fn, config: SGLDConfig, *, backend: str = "auto", device="cpu",
           randomness=None, progress: bool = False, needs=(), restrict=None, init_loss: float | None = None) -> Samples:
    """``config.chains`` SGLD chains from ``model``'s weights on the chosen backend (see ``resolve_backend``).

    ``restrict``: a bool mask [d] or [C, d] over the flat weights (``sampling.restrict.selection_mask``): only
    those are sampled, on a backend with the ``restrict`` capability. ``init_loss``: L_n(w*) when the caller
    knows it (every backend takes it; the any-model backends then make no pass over the data for it)."""
    from ..sampling import resolve_device
    device = resolve_device(device)
    config = config.validate()
    extra = ("restrict",) if restrict is not None else ()
    name = resolve_backend(backend, device, model, loss_fn, tuple(dict.fromkeys((*needs, *config.needs(), *extra))))
    keywords = {"restrict": restrict} if restrict is not None else {}  # backends without it never see the keyword
    if init_loss is not None:
        keywords["init_loss"] = init_loss
    return backend_module(name).sample(model, inputs, targets, loss_fn, config, randomness=randomness,
                                       device=device, progress=progress, **keywords)


def sample_starts(starts, config: SGLDConfig, *, backend: str = "auto", device="cpu", randomness=None,
                  progress: bool = False) -> list[Samples]:
    """``config.chains`` chains from every start (``sampling.starts.Start``) in one batch, on the chosen
    backend that stacks starts; one ``Samples`` per start."""
    from ..sampling import resolve_device
    from ..sampling.starts import check_starts
    import torch.nn.functional as F
    device = resolve_device(device)
    check_starts(starts)
    config = config.validate()
    name = resolve_backend(backend, device, starts[0].model, F.cross_entropy,
                           needs=("stacked_starts", *config.needs()))
    return backend_module(name).sample_starts(starts, config, randomness=randomness, device=device,
                                              progress=progress)


__all__ = ["CHOICES", "NAMES", "auto_order", "backend_module", "names", "resolve_backend", "sample", "sample_starts",
           "with_capabilities"]
