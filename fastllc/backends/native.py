"""Backend ``native``: the study's MLP on the CPU in one fused C++ kernel per chain.

The kernel (``fastllc/kernels/mlp_sgld_cpu.cpp``, compiled on first use by ``fastllc/native_build.py``)
runs all of a chain's steps in a row, one chain per OpenMP thread at a time, with its weights and scratch
in cache: minibatch gather, forward, hand-written backward, SGLD update with localisation, the orthogonal
restriction, the loss record; the published chain loss (``SGLDConfig.chain_loss``) and weight-restricted
sampling (``restrict=``, one mask for all chains or one per chain). It draws CounterRandomness's own streams inside (same seed, same
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

import sys

import numpy as np
import torch

from ..engine import is_study_mlp
from ..errors import FastLLCError
from ..sampling.config import PUBLISHED_LOSS_OFFSET, SGLDConfig
from ..sampling.contract import Samples, nan_from_first_non_finite
from ..sampling.randomness import (_DENSITY, _EDGES, _EDGES32, _RATIOS, _TAIL, CounterRandomness,
                                   InjectedRandomness, for_run)
from ..sampling.restrict import check_mask
from ..sampling.starts import Start, check_starts, per_start, stacked_examples, start_points
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
    if not (_on_cpu(device) and is_study_mlp(model, loss_fn)):
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


def _pointer(array: np.ndarray, ctype):
    import ctypes
    return array.ctypes.data_as(ctypes.POINTER(ctype))


def run_kernel(w: np.ndarray, w_star: np.ndarray, direction: np.ndarray | None, hyper: np.ndarray,
               operands: np.ndarray, targets: np.ndarray, example_offset: np.ndarray, n: int, arch, m: int,
               steps: int, randomness, chain_ids: np.ndarray, *, keep: np.ndarray | None = None,
               loss_offset: float = 0.0, variant: str | None = None, threads: int | None = None,
               tick=None) -> np.ndarray:
    """All chains' ``steps`` steps in place on ``w`` [C, d] float32; returns the loss trace [C, T] float64.

    ``randomness``: CounterRandomness (its streams drawn in the kernel) or InjectedRandomness (read as given).
    ``keep``: the restriction, uint8 [d] (every chain) or [C, d] (one row per chain), or None.
    ``loss_offset``: 0 (cross-entropy) or δ > 0 (the published chain loss −mean log(p_y + δ)).
    ``tick(chain_steps)``, when given, is called as the steps progress (the kernel then runs in chunks).
    """
    import ctypes
    from .. import native_build
    lib = native_build.load(variant)
    p, e, h = arch
    C, d = w.shape
    trace = np.full((C, steps), np.nan, np.float64)
    alive = np.ones(C, np.int32)
    null_i64, null_f32 = ctypes.POINTER(ctypes.c_int64)(), ctypes.POINTER(ctypes.c_float)()
    if isinstance(randomness, InjectedRandomness):
        indices = np.ascontiguousarray(randomness.indices[torch.as_tensor(chain_ids)].numpy(), np.int64)
        noise = np.ascontiguousarray(randomness.noise[torch.as_tensor(chain_ids)].numpy(), np.float32)
        seed, injected = 0, (_pointer(indices, ctypes.c_int64), _pointer(noise, ctypes.c_float))
    elif isinstance(randomness, CounterRandomness):
        seed, injected = randomness.seed, (null_i64, null_f32)
    else:
        raise FastLLCError(f"the native backend draws CounterRandomness's streams or reads InjectedRandomness, "
                           f"not {type(randomness).__name__}; use --backend torch for other generators")
    threads = threads or available_cores()
    chunk = steps if tick is None else max(1, steps // 100)
    tables = (_pointer(_EDGES, ctypes.c_double), _pointer(_EDGES32, ctypes.c_float),
              _pointer(_RATIOS, ctypes.c_float), _pointer(_DENSITY, ctypes.c_double), _TAIL)
    direction_ptr = null_f32 if direction is None else _pointer(direction, ctypes.c_float)
    keep_ptr = ctypes.POINTER(ctypes.c_uint8)() if keep is None else _pointer(keep, ctypes.c_uint8)
    keep_stride = 0 if keep is None or keep.ndim == 1 else d
    for t0 in range(0, steps, chunk):
        n_steps = min(chunk, steps - t0)
        failed = lib.fastllc_mlp_sgld_run(
            C, p, e, h, m, _pointer(w, ctypes.c_float), _pointer(w_star, ctypes.c_float), direction_ptr, keep_ptr,
            keep_stride, loss_offset, _pointer(hyper, ctypes.c_double), _pointer(operands, ctypes.c_int64), _pointer(targets, ctypes.c_int64),
            _pointer(example_offset, ctypes.c_int64), n, _pointer(chain_ids, ctypes.c_int64), seed, *injected, steps,
            *tables, t0, n_steps, _pointer(trace, ctypes.c_double), _pointer(alive, ctypes.c_int32), threads)
        if failed:
            raise FastLLCError("the native kernel could not allocate its scratch memory; use fewer chains")
        if tick is not None:
            tick(C * n_steps)
    return trace


def sample_starts(starts: list[Start], config: SGLDConfig, *, randomness=None, device="cpu",
                  progress: bool = False, variant: str | None = None, threads: int | None = None) -> list[Samples]:
    """Run ``config.chains`` chains from every start as one batch; one ``Samples`` per start.
    ``variant`` and ``threads`` are for tests and benchmarks (default: this CPU's variant, every core)."""
    return _sample_batch(starts, config, randomness, device, progress, variant, threads)


def sample(model, inputs, targets, loss_fn, config: SGLDConfig, *, randomness=None, device="cpu",
           progress: bool = False, restrict: torch.Tensor | None = None, variant: str | None = None,
           threads: int | None = None) -> Samples:
    """``restrict``: a bool mask [d] (every chain) or [C, d] (one row per chain) over the flat weights
    (``sampling/restrict.py``): only those move, the others stay at w* bit for bit (the whole increment is
    masked after the projection; the orthogonal direction is ∇L_n(w*) masked to the chain's selection)."""
    require(device, model, loss_fn)
    start = Start(model, inputs, targets)
    return _sample_batch([start], config, randomness, device, progress, variant, threads, restrict)[0]


def _sample_batch(starts: list[Start], config: SGLDConfig, randomness, device, progress: bool, variant, threads,
                  restrict: torch.Tensor | None = None) -> list[Samples]:
    import time
    from tqdm.auto import tqdm
    config.validate()
    if config.mala:
        raise FastLLCError("the native backend does not record the MALA acceptance; use --backend generic for mala")
    require(device)
    arch, n = check_starts(starts)
    S, C_per, T = len(starts), config.chains, config.steps
    C = S * C_per
    epsilon, gamma, nbeta = config.hyperparameters(n)
    loss_offset = PUBLISHED_LOSS_OFFSET if config.chain_loss == "published" else 0.0

    mask = keep = None
    if restrict is not None:  # one start (``sample``); checked before any work
        d = sum(p.numel() for p in starts[0].model.parameters() if p.requires_grad)
        mask = check_mask(restrict, d, C).cpu()  # [d] (keep_stride 0) or [C, d]
        keep = np.ascontiguousarray(mask.numpy(), np.uint8)

    rows = None if mask is None else mask.expand(C, d)  # restricted (one start): a direction per chain
    init_losses, w_star, direction = start_points(starts, config.orthogonal, rows)
    d = w_star.shape[1]
    w_star = np.ascontiguousarray(w_star.repeat_interleave(C_per, 0).numpy(), np.float32)
    if direction is not None:
        if mask is None:
            direction = direction.repeat_interleave(C_per, 0)
        direction = np.ascontiguousarray(direction.numpy(), np.float32)
    hyper = np.ascontiguousarray(torch.stack([epsilon.repeat(S), gamma.repeat(S), nbeta.repeat(S)], 1).numpy())
    operands, targets = (np.ascontiguousarray(t.numpy(), np.int64) for t in stacked_examples(starts, "cpu"))
    example_offset = (np.arange(C, dtype=np.int64) // C_per) * n
    randomness = for_run(randomness, config, n, d, chains=C)

    w = w_star.copy()
    bar = tqdm(total=C * T, desc=f"SGLD (native, {C} chains)", disable=not progress, leave=False, unit_scale=True)
    start = time.perf_counter()
    trace = run_kernel(w, w_star, direction, hyper, operands, targets, example_offset, n, arch, config.batch_size,
                       T, randomness, np.arange(C, dtype=np.int64), keep=keep, loss_offset=loss_offset,
                       variant=variant, threads=threads, tick=bar.update if progress else None)
    seconds = time.perf_counter() - start
    bar.close()
    trace = nan_from_first_non_finite(torch.from_numpy(trace))
    return per_start(trace, torch.from_numpy(w), init_losses, (epsilon, gamma, nbeta), NAME, torch.device(device),
                     seconds)
