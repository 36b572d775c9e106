"""Backend ``triton``: every chain of the study's MLP advanced by one fused, persistent Triton kernel.

The kernel (``fastllc.kernels.mlp_sgld``) gives each chain one program that keeps the chain's weights on
chip for many steps and writes only the per-step losses; this module is the glue: the start of every
run (L_n(w*), ∇L_n(w*), the orthogonal direction) in PyTorch, per-chain settings, several starting points
stacked into one batch (``sample_starts``, ``sampling/starts.py``: chain j of start s is global chain
s·C + j and its randomness is keyed by that index), and the health of the traces.

Where it runs. On CUDA, where ``auto`` picks it. On CPU only through Triton's interpreter
(``TRITON_INTERPRET=1`` set before ``fastllc.kernels`` is first imported), which is for tests on tiny
shapes: ``supports`` is False on CPU, so ``auto`` never chooses an interpreted run; only an explicit
``backend="triton"`` gets one. Anything else is a one-line ``FastLLCError``.

Randomness. ``randomness=None``: minibatches and noise are drawn in the kernel (Philox keyed by
``config.seed``, chain and step; see the kernel module): reproducible and independent of C, but *not*
the numbers the CPU backends draw for the same seed. ``InjectedRandomness``: read from its tensors
(tests compare with the reference parameter by parameter). Other generators are refused.

Variants, as the reference defines them: ``chain_loss="published"`` (the kernel's PUBLISHED flag) and
``restrict`` (a bool mask [d] or [C, d], ``sampling/restrict.py``: the kernel zeroes the increment of the
fixed weights, and projects on each chain's masked ∇L_n(w*)). Plain SGLD only (no ``rmsprop_sgld``).
"""

from __future__ import annotations

from dataclasses import replace

import importlib.util
import math
import os
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..engines.mlp import is_study_mlp
from ..errors import FastLLCError
from ..sampling.batch import Batch, finish, prepare
from ..sampling.config import SGLDConfig
from ..sampling.contract import Samples
from ..sampling.randomness import InjectedRandomness
from ..sampling.starts import Start

NAME = "triton"
CAPABILITIES = frozenset({"stacked_starts", "published_chain_loss", "restrict"})
DEVICES = ("cuda",)  # and the CPU in Triton's interpreter, for tests only (see the docstring)
AUTO_PRIORITY = 10  # ``auto`` tries lower first: the fastest where it runs (CUDA)

LAUNCHES_WITH_PROGRESS = 50  # a progress bar splits the steps over this many launches (same numbers)


AUTO_MAX_TILE_FLOATS = 8192  # padded weights per chain ``auto`` hands to the kernel: 2× the published shape's


def register_tile_floats(p: int, embed: int, hidden: int) -> int:
    """Weights one program holds in registers: E, L, R, U tiles padded to powers of two ≥ 16, and biases."""
    def pad(size):
        return max(16, 1 << (size - 1).bit_length())
    P, EB, H = pad(p), pad(embed), pad(hidden)
    return P * EB + 2 * H * EB + 2 * H + P * H


def supports(model, loss_fn, device=None) -> bool:
    """The study's MLP with cross-entropy on a CUDA device, Triton installed, and weights small enough to
    live in registers (``AUTO_MAX_TILE_FLOATS``; larger ones, e.g. e=50, h=200, would spill heavily: ``auto``
    then picks ``torch``, an explicit ``backend="triton"`` still runs). Never imports Triton or queries the
    driver: the registry asks every backend this on every ``auto`` run."""
    if device is None or torch.device(device).type != "cuda":
        return False
    return ((model is None or (is_study_mlp(model, loss_fn)
                               and register_tile_floats(model.p, model.embed_dim, model.hidden_dim) <= AUTO_MAX_TILE_FLOATS))
            and importlib.util.find_spec("triton") is not None)


MISSING_TRITON = "the triton backend needs the triton package: pip install 'fastllc[triton]'"


def _not_on_cpu() -> FastLLCError:
    hint = ("pass --device cuda" if torch.cuda.is_available()
            else "CUDA is not available on this machine; use --backend torch")
    return FastLLCError(f"the triton backend runs on CUDA: {hint} (on CPU it runs only in Triton's interpreter, "
                        "for tests: TRITON_INTERPRET=1 set before fastllc.kernels is imported)")


def _kernels(device: torch.device):
    """The kernel module, or a one-line error saying why this device cannot run it."""
    if device.type not in ("cuda", "cpu"):
        raise FastLLCError(f"the triton backend runs on CUDA, not on {device.type}; use --backend torch")
    if importlib.util.find_spec("triton") is None:  # Triton is an extra (CUDA builds of torch bring it)
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise _not_on_cpu()  # installing Triton would not make this run: say what would
        raise FastLLCError(MISSING_TRITON)
    try:
        from .. import kernels
    except ImportError as err:  # installed but broken (e.g. a Triton too old for the kernels)
        raise FastLLCError(f"the triton backend could not import Triton ({err}); use --backend torch") from None
    if device.type == "cpu" and not kernels.INTERPRETED:
        raise _not_on_cpu()
    return kernels


def require(device, model=None, loss_fn=None) -> None:
    """Raise the one-line ``FastLLCError`` now if this backend cannot run on ``device`` (for callers that
    want to fail before training or loading anything, e.g. the CLI on an explicit ``--backend triton``),
    or cannot run ``model`` with ``loss_fn`` when they are given."""
    if model is not None and not is_study_mlp(model, loss_fn):
        raise FastLLCError("the triton backend runs the study's ModularMLP with cross-entropy; "
                           "use --backend reference or generic for other models or losses")
    _kernels(torch.device(device))


def _injected(randomness, batch: Batch):
    """(indices, noise) on the device when the run reads an InjectedRandomness, None when the kernel draws its own."""
    if randomness is None:
        return None
    if not isinstance(randomness, InjectedRandomness):
        raise FastLLCError("the triton backend draws its own randomness (Philox, keyed by the seed) "
                           "or reads InjectedRandomness; it cannot use other generators")
    return randomness.indices.to(batch.device).contiguous(), randomness.noise.to(batch.device).contiguous()


def _prepare(starts: list[Start], config: SGLDConfig, randomness, device, restrict) -> Batch:
    for start in starts:
        if not is_study_mlp(start.model, F.cross_entropy):
            raise FastLLCError("the triton backend runs the study's ModularMLP; use --backend generic for other models")
    if config.seed >= 2**63:
        raise FastLLCError(f"the triton backend takes seeds below 2^63, got {config.seed}")
    batch = prepare(starts, config, restrict=restrict, randomness=randomness, device=device)
    if not 1 <= batch.n < 2**31:
        raise FastLLCError(f"the number of examples must be in [1, 2^31), got {batch.n}")
    return batch


def _launches(batch: Batch, launch, progress: bool) -> float:
    """Run every step, in one launch or (with a progress bar) ``LAUNCHES_WITH_PROGRESS``; the seconds they took."""
    T, cuda = batch.config.steps, batch.device.type == "cuda"
    if cuda:
        launch(0, 0)  # compiles (or loads from Triton's cache) outside the timed loop; moves no weights
        torch.cuda.synchronize(batch.device)
    chunk = math.ceil(T / LAUNCHES_WITH_PROGRESS) if progress else T
    bar = tqdm(total=batch.chains * T, desc=f"SGLD (triton, {batch.chains} chains)", disable=not progress,
               leave=False, unit_scale=True)
    start_time = time.perf_counter()
    for t0 in range(0, T, chunk):
        launch(t0, min(chunk, T - t0))
        if progress:
            if cuda:
                torch.cuda.synchronize(batch.device)
            bar.update(batch.chains * min(chunk, T - t0))
    if cuda:
        torch.cuda.synchronize(batch.device)
    bar.close()
    return time.perf_counter() - start_time


def sample_starts(starts: list[Start], config: SGLDConfig, *, randomness=None, device="cpu",
                  progress: bool = False, restrict: torch.Tensor | None = None) -> list[Samples]:
    """Run ``config.chains`` chains from every start as one launch per chunk of steps (``sampling/batch.py``);
    one ``Samples`` per start. ``restrict``: a bool mask [d] or [config.chains, d], the same for every start."""
    device = torch.device(device)
    kernels = _kernels(device)
    batch = _prepare(starts, config, randomness, device, restrict)
    injected = _injected(randomness, batch)

    def on_device(values, dtype=torch.float32):
        return None if values is None else values.to(device=device, dtype=dtype).contiguous()
    w_star = on_device(batch.w_star)  # [S, d]: the kernel reads start s's row
    direction = on_device(batch.direction)  # [S, d], or [S·C, d] when restricted
    moves = on_device(None if batch.moves is None else batch.moves.expand(batch.chains, batch.d), torch.int8)
    coefficients = on_device(batch.coefficients())  # SGLD's (decay, drift, noise_scale), rounded to fp32
    w = batch.rows(w_star).clone()  # [S·C, d], updated in place by the kernel (a copy: w* stays)
    trace = torch.empty(batch.chains, config.steps, dtype=torch.float32, device=device)

    def launch(t0: int, n_steps: int) -> None:
        kernels.run_chains(w, w_star, direction, coefficients, batch.operands, batch.targets, trace, arch=batch.arch,
                           batch_size=config.batch_size, n=batch.n, chains_per_start=batch.C, seed=config.seed, t0=t0,
                           n_steps=n_steps, injected=injected, published=config.chain_loss == "published", moves=moves)

    seconds = _launches(batch, launch, progress)
    return finish(batch, trace.cpu(), w.cpu(), seconds, NAME)


def sample(model, inputs, targets, loss_fn, config: SGLDConfig, *, randomness=None, device="cpu",
           progress: bool = False, restrict: torch.Tensor | None = None, init_loss: float | None = None) -> Samples:
    """``restrict``: a bool mask [d] (every chain) or [C, d] (one row per chain) over the flat weights
    (``sampling/restrict.py``): only the selected weights move, the others stay at w* bit for bit."""
    if not is_study_mlp(model, loss_fn):
        raise FastLLCError("the triton backend runs the study's ModularMLP with cross-entropy; "
                           "use --backend reference or generic for other models or losses")
    samples = sample_starts([Start(model, inputs, targets)], config, randomness=randomness, device=device,
                            progress=progress, restrict=restrict)[0]
    return samples if init_loss is None else replace(samples, init_loss=float(init_loss))  # the caller's L_n(w*)
