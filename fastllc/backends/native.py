"""Backend ``native``: the study's MLP on the CPU in one fused C++ kernel per chain.

The kernel (``fastllc/kernels/mlp_sgld_cpu.cpp``, compiled on first use by ``fastllc/native_build.py``)
runs all of a chain's steps in a row, one chain per OpenMP thread at a time, with its weights and scratch
in cache: minibatch gather, forward, hand-written backward, SGLD update with localisation, the orthogonal
restriction, the loss record; the published chain loss (``SGLDConfig.chain_loss``) and weight-restricted
sampling (``restrict=``, one mask for all chains or one per chain, in ``sample`` and ``sample_starts``). It draws CounterRandomness's own streams inside (same seed, same
trajectory as the torch and reference backends up to fp32 rounding), or reads an ``InjectedRandomness``.
Any other randomness object (one that only has ``fill``/``draw``) is refused with a one-line error.
The kernel flushes subnormal floats to zero in its own threads (a trained network's confident predictions
make them; some CPUs compute them ~100× slower) and leaves every thread's floating-point mode as it found it.
The build it runs is the fastest this CPU runs, timed once at first build (``fastllc/native_build.py``;
``FASTLLC_NATIVE_VARIANT`` or ``variant=`` chooses another).

Without a working C++ compiler ``auto`` passes over this backend (one notice on stderr, once per
process) and ``--backend native`` is a one-line error.
"""

from __future__ import annotations

from dataclasses import replace

import sys
import time

import numpy as np
import torch

from ..engines.mlp import is_study_mlp
from ..errors import FastLLCError
from ..sampling.batch import Batch, finish, prepare
from ..sampling.config import PUBLISHED_LOSS_OFFSET, SGLDConfig
from ..sampling.contract import Samples
from ..sampling.randomness import CounterRandomness, InjectedRandomness, ziggurat_tables
from ..sampling.starts import Start
from ..sampling.threads import available_cores

NAME = "native"
CAPABILITIES = frozenset({"stacked_starts", "restrict", "published_chain_loss"})
DEVICES = ("cpu",)
AUTO_PRIORITY = 15  # after triton (10, CUDA only), before torch (20): the study's MLP on the CPU where the kernel builds

_notice_given = False


def unavailable_reason() -> str | None:
    """Why the kernel cannot run here (one line), or None when it builds and loads (built on the first call)."""
    from .. import native_build
    try:
        native_build.load()
    except native_build.NativeUnavailable as err:
        return str(err)
    return None


def _on_cpu(device) -> bool:
    return device is None or torch.device(device).type == "cpu"


def supports(model, loss_fn, device=None) -> bool:
    """The study's MLP with cross-entropy on the CPU, where the kernel builds (else one notice, once)."""
    global _notice_given
    if not (_on_cpu(device) and (model is None or is_study_mlp(model, loss_fn))):
        return False
    reason = unavailable_reason()
    if reason is not None and not _notice_given:
        _notice_given = True
        print(f"fastllc: the native backend is unavailable ({reason}); using the next backend", file=sys.stderr)
    return reason is None


def require(device, model=None, loss_fn=None) -> None:
    """The one-line reason this backend cannot run here, else nothing."""
    if not _on_cpu(device):
        raise FastLLCError(f"the native backend runs on the CPU, not {device}; use --backend torch or triton")
    if model is not None and not is_study_mlp(model, loss_fn):
        raise FastLLCError("the native backend runs the study's ModularMLP with cross-entropy; "
                           "use --backend reference for other models or losses")
    reason = unavailable_reason()
    if reason is not None:
        raise FastLLCError(f"the native backend is unavailable: {reason}; or use --backend torch")


def _contiguous(values, dtype) -> np.ndarray | None:
    return None if values is None else np.ascontiguousarray(np.asarray(values), dtype)


def _randomness_arguments(randomness, chain_ids: np.ndarray) -> dict:
    """The kernel's randomness: CounterRandomness's streams (drawn in the kernel) or an InjectedRandomness's rows."""
    if isinstance(randomness, InjectedRandomness):
        rows = torch.as_tensor(chain_ids)
        return dict(seed=0, injected_indices=_contiguous(randomness.indices[rows].numpy(), np.int64),
                    injected_noise=_contiguous(randomness.noise[rows].numpy(), np.float32))
    if isinstance(randomness, CounterRandomness):
        return dict(seed=randomness.seed, injected_indices=None, injected_noise=None)
    raise FastLLCError(f"the native backend draws CounterRandomness's streams or reads InjectedRandomness, "
                       f"not {type(randomness).__name__}; use --backend torch for other generators")


def run_kernel(batch: Batch, w: np.ndarray, *, variant: str | None = None, threads: int | None = None,
               tick=None) -> np.ndarray:
    """All of the batch's steps in place on ``w`` [S·C, d] float32; returns the loss trace [S·C, T] float64.
    ``tick(chain_steps)``, when given, is called as the steps progress (the kernel then runs in chunks)."""
    from .. import native_build
    lib = native_build.load(variant)
    config, (p, e, h), C, T = batch.config, batch.arch, batch.chains, batch.config.steps
    moves = _contiguous(batch.moves, np.uint8)
    arguments = dict(
        C=C, p=p, e=e, h=h, m=config.batch_size, w=w, w_star=_contiguous(batch.rows(batch.w_star), np.float32),
        direction=_contiguous(None if batch.direction is None else batch.rows(batch.direction), np.float32),
        moves=moves, moves_stride=0 if moves is None or moves.ndim == 1 else batch.d,
        loss_offset=PUBLISHED_LOSS_OFFSET if config.chain_loss == "published" else 0.0,
        coefficients=_contiguous(batch.coefficients(), np.float64), ops=_contiguous(batch.operands.cpu(), np.int64),
        targets=_contiguous(batch.targets.cpu(), np.int64), example_offset=_contiguous(batch.example_offset, np.int64),
        n=batch.n, chain_ids=batch.ids, total_steps=T, **_randomness_arguments(batch.randomness, batch.ids),
        **ziggurat_tables(), trace=np.full((C, T), np.nan, np.float64), alive=np.ones(C, np.int32),
        threads=threads or available_cores())
    chunk = T if tick is None else max(1, T // 100)
    for t0 in range(0, T, chunk):
        n_steps = min(chunk, T - t0)
        if native_build.call(lib, **arguments, t0=t0, n_steps=n_steps):
            raise FastLLCError("the native kernel could not allocate its scratch memory; use fewer chains")
        if tick is not None:
            tick(C * n_steps)
    return arguments["trace"]


def sample_starts(starts: list[Start], config: SGLDConfig, *, randomness=None, device="cpu", progress: bool = False,
                  restrict: torch.Tensor | None = None, variant: str | None = None,
                  threads: int | None = None) -> list[Samples]:
    """Run ``config.chains`` chains from every start as one batch (``sampling/batch.py``); one ``Samples`` per start.
    ``restrict``: a bool mask [d] or [config.chains, d], the same for every start (``sampling/restrict.py``).
    ``variant`` and ``threads`` are for tests and benchmarks (default: this CPU's variant, every core)."""
    from tqdm.auto import tqdm
    if config.mala:
        raise FastLLCError("the native backend does not record the MALA acceptance; use --backend generic for mala")
    require(device)
    batch = prepare(starts, config, restrict=restrict, randomness=randomness, device="cpu")
    w = np.array(batch.rows(batch.w_star).numpy(), np.float32)  # a copy: the kernel moves it, w* stays
    bar = tqdm(total=batch.chains * config.steps, desc=f"SGLD (native, {batch.chains} chains)", disable=not progress,
               leave=False, unit_scale=True)
    start = time.perf_counter()
    trace = run_kernel(batch, w, variant=variant, threads=threads, tick=bar.update if progress else None)
    seconds = time.perf_counter() - start
    bar.close()
    return finish(batch, torch.from_numpy(trace), torch.from_numpy(w), seconds, NAME)


def sample(model, inputs, targets, loss_fn, config: SGLDConfig, *, randomness=None, device="cpu",
           progress: bool = False, restrict: torch.Tensor | None = None, init_loss: float | None = None, variant: str | None = None,
           threads: int | None = None) -> Samples:
    """``restrict``: a bool mask [d] (every chain) or [C, d] (one row per chain) over the flat weights
    (``sampling/restrict.py``): only those move, the others stay at w* bit for bit (the whole increment is
    masked after the projection; the orthogonal direction is ∇L_n(w*) masked to the chain's selection)."""
    require(device, model, loss_fn)
    samples = sample_starts([Start(model, inputs, targets)], config, randomness=randomness, device=device,
                            progress=progress, restrict=restrict, variant=variant, threads=threads)[0]
    return samples if init_loss is None else replace(samples, init_loss=float(init_loss))  # the caller's L_n(w*)
