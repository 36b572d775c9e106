"""One command for a GPU machine: every CUDA path against the reference, then GPU throughput.

    python -m fastllc.selfcheck --gpu --out gpu.json

Checks (small shapes, the patterns of tests/test_backend_torch.py, test_backend_generic.py and
test_backend_triton.py): the ``torch``, ``generic`` and ``triton`` backends on CUDA against the reference
sampler on CPU, fed the same ``InjectedRandomness`` and compared parameter by parameter (``torch`` and
``triton`` also with the published chain loss and with restricted weights); the triton
kernel's in-kernel Philox draws against the reference fed ``kernels.draws``; chain trajectories
independent of the chain count;
the moments of the kernel's noise. Then chain-steps per second of ``triton`` and ``torch`` at C = 64,
1024 and 4096 on the published shape (p=53, e=8, h=32, m=64; the study's ε, γ and orthogonal steps),
kept short so that everything finishes in a few minutes (``--budget`` stops the benchmarks early).

Output: a line per check and benchmark, and with ``--out`` one JSON summary (rewritten after every
benchmark, so nothing is lost if the run is cut short). Exit status 1 if a check failed or a
benchmark raised, 0 otherwise; without CUDA it prints "no CUDA: nothing to check" and exits 0.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .errors import FastLLCError
from .model import ModularMLP
from .sampling import InjectedRandomness, SGLDConfig
from .sampling.config import PUBLISHED_LOSS_OFFSET
from .sampling.contract import flat_parameters
from .tasks import make_task

NO_CUDA = "no CUDA: nothing to check"
PER_CHAIN = dict(epsilon=[1e-3, 2e-3, 5e-4], gamma=[5.0, 1.0, 0.0], nbeta=[10.0, 20.0, 30.0])
# Tolerances. Every fast backend is fp32 like the reference and differs from it in summation order (cuBLAS,
# GPU reductions, FMA contraction, libdevice's erf/exp: a few ulps per operation), ~1e-6 relative per step's
# gradient, scaled by ε·nβ/2 and adding up about linearly: steps × ε·nβ/2 ≤ 2 here (100 × 0.02; 10 × 0.1 at
# the published shape), so ≤ ~1e-5 on O(1) weights (measured on CPU: 6.8e-6 torch and generic, 7e-7 triton
# interpreted). 5e-5 is tests/test_backend_torch.py's bound for the same argument (and bench/test_bench_triton.py's
# on the GPU); a wrong term (a missing γ, a factor 2, a misplaced padding mask) shows as ≥ 1e-3.
ACROSS_BACKENDS = 5e-5
SAME_PROGRAM = 1e-5  # one backend on CUDA and on CPU, the same seeded streams: tests/test_backend_torch.py's cuda test
BIT_FOR_BIT = 0.0  # the triton kernel's chain c is the same program whatever the number of chains
STANDARD_ERRORS = 5.0  # noise moments: a false alarm < 1e-6 per moment
PUBLISHED_SHAPE = (53, 8, 32, 64)  # p, e, h, m
# (C, T): as bench/test_bench_triton.py, but triton's C and T all multiples of 16, which Triton specialises
# integer arguments on: one compiled kernel serves all three (each compile takes tens of seconds)
BENCHMARK_PLAN = {"triton": [(64, 2048), (1024, 512), (4096, 256)],
                  "torch": [(64, 200), (1024, 50), (4096, 20)]}  # host-side randomness: slower per step
WARM_UP_STEPS = 16  # a multiple of 16 too: the warm-up compiles the kernel the timed run uses


@dataclass
class CheckResult:
    name: str
    passed: bool
    max_error: float | None
    tolerance: float
    error: str | None = None  # the exception's one line, when the check could not run


@dataclass
class BenchmarkResult:
    backend: str
    chains: int
    steps: int
    seconds: float | None
    chain_steps_per_second: float | None
    error: str | None = None  # the exception's one line, or why it was not run


def _setting(p, e, h, seed):
    x, y = make_task(p, "add", seed=0).train_data()
    torch.manual_seed(seed)
    return ModularMLP(p, e, h), x, y


def _difference(fast, ref) -> float:
    """Largest absolute difference of final weights and loss traces (inf if either has NaN/inf)."""
    errors = [(fast.final_params.cpu().double() - ref.final_params.cpu().double()).abs().max(),
              (fast.loss_trace.cpu().double() - ref.loss_trace.cpu().double()).abs().max()]
    worst = max(float(e) for e in errors)
    return worst if math.isfinite(worst) else math.inf


def _against_reference(backend: str, device, shape, chains, steps, settings, *, chain_loss="exact",
                       output_scale=1.0, restrict=None, **options) -> float:
    """``backend`` on ``device`` and the reference on CPU, the same injected noise: the largest difference.

    ``output_scale`` multiplies the output weights (confident logits: some p_y < 1e-6, where the published
    chain loss departs from cross-entropy); ``restrict``: a selection (``sampling/restrict.py``) both sample."""
    from .backends import backend_module
    from .sampling.restrict import selection_mask

    reference = backend_module("reference")
    p, e, h, m = shape
    model, x, y = _setting(p, e, h, seed=p)
    with torch.no_grad():
        model.unembed.weight.mul_(output_scale)
    if restrict is not None:
        options["restrict"] = selection_mask(model, restrict)
    if chain_loss == "published" and not bool((F.log_softmax(model(x), -1).gather(-1, y.view(-1, 1)).exp()
                                                < PUBLISHED_LOSS_OFFSET).any()):
        raise RuntimeError("no example has p_y < 1e-6: the published-loss comparison would be vacuous")
    noise = InjectedRandomness.seeded(chains, steps, len(y), m, flat_parameters(model)[2].numel(), seed=2)
    config = SGLDConfig(chains=chains, steps=steps, batch_size=m, orthogonal=True, chain_loss=chain_loss, **settings)
    ref = reference.sample(model, x, y, F.cross_entropy, config, randomness=noise,
                           **{k: v for k, v in options.items() if k == "restrict"})
    if (ref.final_params - flat_parameters(model)[2]).abs().max() < 1e-2:
        raise RuntimeError("the reference chains did not move: the comparison would be vacuous")
    fast = backend_module(backend).sample(copy.deepcopy(model), x, y, F.cross_entropy, config, randomness=noise,
                                          device=device, **options)
    if restrict is not None and not torch.equal(fast.final_params.cpu()[:, ~options["restrict"]],
                                                ref.final_params[:, ~options["restrict"]]):
        return math.inf  # the fixed weights must stay at w* bit for bit
    return _difference(fast, ref)


def _torch_seeded_on_device_and_cpu(device) -> float:
    from .backends import backend_module

    batched = backend_module("torch")
    model, x, y = _setting(7, 5, 13, seed=7)
    config = SGLDConfig(chains=3, steps=20, batch_size=8, seed=7)
    here = batched.sample(model, x, y, F.cross_entropy, config, device=device)
    cpu = batched.sample(model, x, y, F.cross_entropy, config)
    return _difference(here, cpu)


def _kernels(device):
    from .backends import backend_module

    backend_module("triton").require(device)  # the backend's own one-line reason if it cannot run here (e.g. Triton missing)
    from . import kernels
    return kernels


def _triton_in_kernel_randomness(device) -> float:
    """The kernel's own Philox draws equal what ``kernels.draws`` gives the reference (published shape)."""
    from .backends import backend_module

    fused, reference = backend_module("triton"), backend_module("reference")
    kernels = _kernels(device)
    p, e, h, m = PUBLISHED_SHAPE
    model, x, y = _setting(p, e, h, seed=0)
    chains, steps, d = 2, 6, flat_parameters(model)[2].numel()
    config = SGLDConfig(chains=chains, steps=steps, batch_size=m, seed=5, orthogonal=True)
    fast = fused.sample(model, x, y, F.cross_entropy, config, device=device)
    idx, noise = kernels.draws(config.seed, chains, steps, len(y), m, d, device=device)
    ref = reference.sample(model, x, y, F.cross_entropy, config, randomness=InjectedRandomness(idx.cpu(), noise.cpu()))
    return _difference(fast, ref)


def _triton_chain_count(device) -> float:
    from .backends import backend_module

    fused = backend_module("triton")
    _kernels(device)
    p, e, h, m = PUBLISHED_SHAPE
    model, x, y = _setting(p, e, h, seed=0)
    # 2 and 3 chains of 6 steps: integer arguments Triton specialises alike (not 1, not multiples of 16),
    # so the in-kernel randomness check's compiled kernel serves
    two = fused.sample(model, x, y, F.cross_entropy, SGLDConfig(chains=2, steps=6, batch_size=m, seed=11,
                                                                orthogonal=True), device=device)
    three = fused.sample(model, x, y, F.cross_entropy, SGLDConfig(chains=3, steps=6, batch_size=m, seed=11,
                                                                  orthogonal=True), device=device)
    three.final_params, three.loss_trace = three.final_params[:2], three.loss_trace[:2]
    return _difference(two, three)


def _triton_noise_moments(device) -> float:
    """|z| of the worst of mean 0, variance 1 and fourth moment 3 of the kernel's unit noise (131,072 draws)."""
    kernels = _kernels(device)
    xi = kernels.draws(5, 4, 8, 10, 64, 4096, device=device, block=1024)[1].cpu().double()
    n = xi.numel()
    return max(abs(xi.mean().item()) / math.sqrt(1 / n), abs(xi.var().item() - 1) / math.sqrt(2 / n),
               abs((xi**4).mean().item() - 3) / math.sqrt(96 / n))


def check_list(device) -> list[tuple[str, Callable[[], float], float]]:
    """(name, function returning the largest error, tolerance) of every check on ``device``."""
    small = (7, 5, 13, 16)  # awkward, non-power-of-two shapes, as tests/test_backend_torch.py
    padded = (11, 5, 13, 11)  # every triton tile padded and masked, as tests/test_backend_triton.py
    # the study's chain loss −log(p_y + 1e-6) on confident logits (output weights ×20: some p_y < 1e-6), and
    # a restricted run (the left layer and the output weights), as tests/test_backend_torch.py and _triton.py
    published = dict(chain_loss="published", output_scale=20.0)
    restricted = dict(restrict=["left.*", "unembed.weight"])
    return [
        ("torch vs reference, injected noise (p=7 e=5 h=13 m=16, 3 chains x 100 steps)",
         lambda: _against_reference("torch", device, small, 3, 100, PER_CHAIN), ACROSS_BACKENDS),
        ("torch on the device vs on CPU, seeded streams (3 chains x 20 steps)",
         lambda: _torch_seeded_on_device_and_cpu(device), SAME_PROGRAM),
        ("generic vs reference, injected noise, traced step (p=7 e=5 h=13 m=16, 3 chains x 100 steps)",
         lambda: _against_reference("generic", device, small, 3, 100, PER_CHAIN, trace=True), ACROSS_BACKENDS),
        ("torch vs reference, published chain loss (p=7 e=5 h=13 m=16, 3 chains x 30 steps)",
         lambda: _against_reference("torch", device, small, 3, 30, PER_CHAIN, **published), ACROSS_BACKENDS),
        ("torch vs reference, restricted weights (p=7 e=5 h=13 m=16, 3 chains x 60 steps)",
         lambda: _against_reference("torch", device, small, 3, 60, PER_CHAIN, **restricted), ACROSS_BACKENDS),
        ("triton vs reference, injected noise, padded tiles (p=11 e=5 h=13 m=11, 3 chains x 20 steps)",
         lambda: _against_reference("triton", device, padded, 3, 20, PER_CHAIN), ACROSS_BACKENDS),
        ("triton vs reference, published chain loss, padded tiles (p=11 e=5 h=13 m=11, 3 chains x 20 steps)",
         lambda: _against_reference("triton", device, padded, 3, 20, PER_CHAIN, **published), ACROSS_BACKENDS),
        ("triton vs reference, restricted weights, padded tiles (p=11 e=5 h=13 m=11, 3 chains x 20 steps)",
         lambda: _against_reference("triton", device, padded, 3, 20, PER_CHAIN, **restricted), ACROSS_BACKENDS),
        ("triton vs reference, injected noise, published shape (p=53 e=8 h=32 m=64, 2 chains x 10 steps)",
         lambda: _against_reference("triton", device, PUBLISHED_SHAPE, 2, 10,
                                    dict(epsilon=[1e-3, 2e-3], nbeta=[50.0, 100.0])), ACROSS_BACKENDS),
        ("triton in-kernel randomness vs reference fed kernels.draws (published shape, 2 chains x 6 steps)",
         lambda: _triton_in_kernel_randomness(device), ACROSS_BACKENDS),
        ("triton chains 0-1 of 2 and of 3 chains, bit for bit", lambda: _triton_chain_count(device), BIT_FOR_BIT),
        ("triton noise moments (mean, variance, 4th), worst |z|", lambda: _triton_noise_moments(device),
         STANDARD_ERRORS),
    ]


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def run_checks(checks, report=print) -> list[CheckResult]:
    """Run every check; a check that raises is a failure with the exception's first line, never a crash."""
    results = []
    for name, check, tolerance in checks:
        try:
            error = float(check())
            result = CheckResult(name, math.isfinite(error) and error <= tolerance, error, tolerance)
        except Exception as err:  # noqa: BLE001  (reported, and the run fails at the end)
            result = CheckResult(name, False, None, tolerance, _one_line(err))
        results.append(result)
        measured = f"max error {result.max_error:.2e}" if result.max_error is not None else result.error
        report(f"{'ok  ' if result.passed else 'FAIL'} {name}: {measured} (tolerance {tolerance:g})")
    return results


def benchmark(backend: str, chains: int, steps: int, device) -> BenchmarkResult:
    """Chain-steps per second of ``backend`` on the published shape (the sampler's own loop time, after a
    short run that compiles or warms up outside it)."""
    from .backends import backend_module

    p, e, h, m = PUBLISHED_SHAPE
    model, x, y = _setting(p, e, h, seed=0)  # untrained: throughput does not depend on the weights
    module = backend_module(backend)
    settings = dict(chains=chains, batch_size=m, epsilon=1e-3, gamma=5.0, orthogonal=True)  # the study's
    module.sample(model, x, y, F.cross_entropy, SGLDConfig(steps=WARM_UP_STEPS, **settings), device=device)
    samples = module.sample(model, x, y, F.cross_entropy, SGLDConfig(steps=steps, **settings), device=device)
    if not torch.isfinite(samples.loss_trace).all():
        raise RuntimeError("a benchmarked chain produced a non-finite loss")
    return BenchmarkResult(backend, chains, steps, samples.seconds, chains * steps / samples.seconds)


def run_benchmarks(plan, device, deadline: float, report=print, on_result=lambda results: None):
    """Every (backend, C, T) of ``plan`` until ``deadline`` (time.monotonic()); later ones are recorded as skipped."""
    results = []
    for backend, runs in plan.items():
        for chains, steps in runs:
            if time.monotonic() > deadline:
                result = BenchmarkResult(backend, chains, steps, None, None, "skipped: --budget reached")
            else:
                try:
                    result = benchmark(backend, chains, steps, device)
                except Exception as err:  # noqa: BLE001  (reported, and the run fails at the end)
                    result = BenchmarkResult(backend, chains, steps, None, None, _one_line(err))
            results.append(result)
            on_result(results)
            if result.chain_steps_per_second is not None:
                report(f"bench {backend} C={chains} T={steps}: {result.chain_steps_per_second:,.0f} chain-steps/s "
                       f"({result.seconds:.2f} s)")
            else:
                report(f"bench {backend} C={chains} T={steps}: {result.error}")
    return results


def environment() -> dict:
    def version(package):
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return dict(gpu=gpu, torch=torch.__version__, cuda=torch.version.cuda, triton=version("triton"),
                fastllc=version("fastllc"), python=platform.python_version())


def summary(checks: list[CheckResult], benchmarks: list[BenchmarkResult], env: dict, seconds: float) -> dict:
    return dict(passed=exit_status(checks, benchmarks) == 0, environment=env, seconds=round(seconds, 1),
                checks=[asdict(c) for c in checks], benchmarks=[asdict(b) for b in benchmarks])


def exit_status(checks: list[CheckResult], benchmarks: list[BenchmarkResult]) -> int:
    """1 if a check failed or a benchmark raised (a benchmark skipped for the time budget is not a failure)."""
    broken = [b for b in benchmarks if b.error and not b.error.startswith("skipped")]
    return 1 if broken or not all(c.passed for c in checks) else 0


def write_summary(path: Path, content: dict) -> None:
    """Write the JSON atomically: a reader (or a run cut short) sees the previous or the new file, never half."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as out:
            json.dump(content, out, indent=2)
            out.write("\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _arguments(argv):
    parser = argparse.ArgumentParser(prog="python -m fastllc.selfcheck", description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="check every CUDA path, then benchmark (required)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON summary here")
    parser.add_argument("--no-bench", action="store_true", help="the correctness checks only")
    parser.add_argument("--budget", type=float, default=420.0,
                        help="seconds after which remaining benchmarks are skipped (default 420)")
    args = parser.parse_args(argv)
    if not args.gpu:
        raise FastLLCError("say what to check: --gpu (the CPU paths are the test suite's: python -m pytest -q)")
    if args.out is not None and not args.out.parent.is_dir():
        raise FastLLCError(f"--out: the directory {args.out.parent} does not exist; create it or choose another")
    if args.out is not None and args.out.is_dir():
        raise FastLLCError(f"--out: {args.out} is a directory; give a file name, e.g. {args.out / 'gpu.json'}")
    return args


def main(argv=None) -> int:
    try:
        args = _arguments(argv)
        if not torch.cuda.is_available():
            print(NO_CUDA)
            return 0
        if os.environ.get("TRITON_INTERPRET") == "1":
            raise FastLLCError("TRITON_INTERPRET=1 is set: unset it, the GPU check runs the compiled kernel")
    except FastLLCError as err:
        print(f"Error: {err}", file=sys.stderr)
        return 1
    started, device = time.monotonic(), torch.device("cuda")
    env = environment()
    print(f"fastllc selfcheck on {env['gpu']} (torch {env['torch']}, CUDA {env['cuda']}, triton {env['triton']})")

    def save(checks, benchmarks):
        if args.out is not None:
            write_summary(args.out, summary(checks, benchmarks, env, time.monotonic() - started))

    checks = run_checks(check_list(device))
    save(checks, [])
    benchmarks = [] if args.no_bench else run_benchmarks(
        BENCHMARK_PLAN, device, started + args.budget, on_result=lambda done: save(checks, done))
    status = exit_status(checks, benchmarks)
    failed = sum(not c.passed for c in checks)
    print(f"{len(checks) - failed} of {len(checks)} checks passed in {time.monotonic() - started:.0f} s"
          + (f"; summary in {args.out}" if args.out is not None else ""))
    return status


if __name__ == "__main__":
    sys.exit(main())
