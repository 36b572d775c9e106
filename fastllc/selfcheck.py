"""One command for a GPU machine: every CUDA path against the reference, then GPU throughput.

    python -m fastllc.selfcheck --gpu --out gpu.json

Checks: the conformance checks (``fastllc.conformance``) of every backend that runs on CUDA (``torch``,
``generic``, ``triton``): each on the GPU against the reference sampler on CPU, fed the same
``InjectedRandomness`` and compared parameter by parameter, on every variant its capabilities allow, with the
one derived tolerance (the same checks tests/test_conformance.py runs on CPU), and each at the published shape;
then the ``torch`` backend on the GPU against itself on CPU with the same seeded streams; the triton kernel's
in-kernel Philox draws against the reference fed ``kernels.draws``; chain trajectories independent of the chain
count; the moments of the kernel's noise; the language-model path (``generic`` running fastllc.lm's one-block
GPT-2 against the reference on CPU, and bf16 autocast against float32: λ̂ within 3 standard errors). Then
chain-steps per second of ``triton`` and ``torch`` at C = 64, 1024 and 4096 on the published shape (p=53, e=8,
h=32, m=64; the study's ε, γ and orthogonal steps), and of fastllc.lm in float32 and bf16 at 16 and 64 chains on
the LM benchmarks' tiny GPT-2, kept short so that everything finishes in a few minutes (``--budget`` stops the
benchmarks early).

Output: a line per check and benchmark, and with ``--out`` one JSON summary (rewritten after every
benchmark, so nothing is lost if the run is cut short; a check's ``max_error`` is conformance's relative
difference |a − b| / max(1, |b|), or a |z| or 0 where its name says so). Exit status 1 if a check failed or a
benchmark raised, 0 otherwise; without CUDA it prints "no CUDA: nothing to check" and exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from . import conformance
from .errors import FastLLCError
from .model import ModularMLP
from .sampling import InjectedRandomness, SGLDConfig
from .sampling.contract import flat_parameters
from .storage import write_atomically
from .tasks import make_task

NO_CUDA = "no CUDA: nothing to check"
# Tolerances: every comparison of two runs is conformance's, |a − b| / max(1, |b|) ≤ 2·T·eps(float32) after T steps
# (fastllc/conformance.py derives it); the triton kernel's chain c is the same program whatever the number of
# chains (bit for bit); noise moments within 5 standard errors (a false alarm < 1e-6 per moment).
BIT_FOR_BIT = 0.0
STANDARD_ERRORS = 5.0
PUBLISHED_SHAPE = conformance.PUBLISHED_SHAPE  # p, e, h, m
# (C, T): as bench/test_bench_triton.py, but triton's C and T all multiples of 16, which Triton specialises
# integer arguments on: one compiled kernel serves all three (each compile takes tens of seconds)
BENCHMARK_PLAN = {"triton": [(64, 2048), (1024, 512), (4096, 256)],
                  "torch": [(64, 200), (1024, 50), (4096, 20)]}  # host-side randomness: slower per step
WARM_UP_STEPS = 16  # a multiple of 16 too: the warm-up compiles the kernel the timed run uses
# The language-model path (fastllc.lm on the generic backend, the one that runs on CUDA): (chains, steps, bf16) on
# the LM benchmarks' tiny GPT-2 shape (bench/lm_workload.py), untrained
LM_BENCHMARK_PLAN = [(16, 200, False), (16, 200, True), (64, 100, False), (64, 100, True)]
LM_SHAPE = (31, 16, 48, 8)  # vocabulary, width, MLP width, sequences per minibatch: conformance's causal LM
# bf16 autocast against float32, the same seeded chains: λ̂ within this many standard errors of the paired (per-chain)
# difference (on the CPU: 0.32, the λ̂ of 2.19 moved by −1e-4)
BF16_STANDARD_ERRORS = 3.0


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


def _torch_seeded_on_device_and_cpu(device) -> float:
    from .backends import backend_module

    batched = backend_module("torch")
    model, x, y = _setting(7, 5, 13, seed=7)
    config = SGLDConfig(chains=3, steps=20, batch_size=8, seed=7)
    here = batched.sample(model, x, y, F.cross_entropy, config, device=device)
    cpu = batched.sample(model, x, y, F.cross_entropy, config)
    return conformance.differences(here, cpu, config.steps).error


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
    return conformance.differences(fast, ref, steps).error


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
    return conformance.differences(two, three, 6).error


def _triton_noise_moments(device) -> float:
    """|z| of the worst of mean 0, variance 1 and fourth moment 3 of the kernel's unit noise (131,072 draws)."""
    kernels = _kernels(device)
    xi = kernels.draws(5, 4, 8, 10, 64, 4096, device=device, block=1024)[1].cpu().double()
    n = xi.numel()
    return max(abs(xi.mean().item()) / math.sqrt(1 / n), abs(xi.var().item() - 1) / math.sqrt(2 / n),
               abs((xi**4).mean().item() - 3) / math.sqrt(96 / n))


def cuda_backends() -> list[str]:
    """The backends that declare CUDA: what this command checks (on the CPU too, when its tests run it there)."""
    from .backends import backend_module
    return [name for name in conformance.subjects() if "cuda" in backend_module(name).DEVICES]


def conformance_checks(device) -> list[tuple[str, Callable[[], float], float]]:
    """fastllc.conformance's checks of every CUDA backend on ``device``: every variant at its small shape, and
    plain orthogonal SGLD at the published shape (the register tiles and padding of the study's network)."""
    device = torch.device(device).type
    published = [conformance.Case(name, "orthogonal", device, PUBLISHED_SHAPE) for name in cuda_backends()]
    return [(case.name, lambda case=case: conformance.check(case).error, conformance.TOLERANCE[torch.float32])
            for case in conformance.cases(device, cuda_backends()) + published]


def lm_checks(device) -> list[tuple[str, Callable[[], float], float]]:
    """The language-model path on ``device``: ``generic`` running fastllc.lm's causal LM (a one-block GPT-2) against
    the reference on CPU, plain, orthogonal and restricted; and bf16 autocast against float32."""
    device = torch.device(device).type
    cases = [conformance.Case("generic", v, device, LM_SHAPE, workload="causal_lm")
             for v in ("sgld", "orthogonal", "restrict")]
    return [(case.name, lambda case=case: conformance.check(case).error, conformance.TOLERANCE[torch.float32])
            for case in cases] + [
        ("fastllc.lm bf16 autocast vs float32, |Δλ̂| in standard errors of the paired difference (8 chains x 100 steps)",
         lambda: _lm_bf16_against_fp32(device), BF16_STANDARD_ERRORS)]


def _tiny_lm(seed: int = 0):
    """(a one-block GPT-2 of ``LM_SHAPE`` in eval mode, 256 random sequences of 12 tokens), untrained."""
    vocab, width, hidden, _ = LM_SHAPE
    import transformers
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=width, n_inner=hidden, vocab_size=vocab,
                                         n_positions=12, bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(config).eval()
        tokens = torch.randint(vocab, (256, 12))
    return model, tokens


def _lm_bf16_against_fp32(device) -> float:
    from . import lm
    model, tokens = _tiny_lm()
    settings = dict(chains=8, steps=100, batch_size=LM_SHAPE[3], epsilon=1e-3, gamma=100.0, nbeta=30.0, seed=0,
                    backend="generic", device=device)
    fp32, bf16 = (lm.estimate(model, tokens, bf16=flag, **settings) for flag in (False, True))
    # the same seed: chain c of both runs shares its noise and minibatches, so the difference is paired, its standard
    # error far below either run's (a combined SE would hide a real bf16 bias)
    differences = [b - f for b, f in zip(bf16.llc_per_chain, fp32.llc_per_chain)]
    mean = sum(differences) / len(differences)
    spread = math.sqrt(sum((x - mean) ** 2 for x in differences) / (len(differences) - 1))
    return abs(mean) / (spread / math.sqrt(len(differences))) if spread > 0 else (0.0 if mean == 0 else math.inf)


def check_list(device) -> list[tuple[str, Callable[[], float], float]]:
    """(name, function returning the largest error, tolerance) of every check on ``device``."""
    tolerance = conformance.tolerance
    return conformance_checks(device) + lm_checks(device) + [
        ("torch on the device vs on CPU, seeded streams (3 chains x 20 steps)",
         lambda: _torch_seeded_on_device_and_cpu(device), tolerance(torch.float32, 20)),
        ("triton in-kernel randomness vs reference fed kernels.draws (published shape, 2 chains x 6 steps)",
         lambda: _triton_in_kernel_randomness(device), tolerance(torch.float32, 6)),
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


def lm_benchmark(chains: int, steps: int, bf16: bool, device) -> BenchmarkResult:
    """Chain-steps per second of fastllc.lm on ``device`` (generic backend) on a GPT-2 of the LM benchmarks' shape
    (2 layers, 4 heads, width 64, vocabulary 64, 16 sequences of 32 tokens a minibatch), after a warm-up."""
    import transformers

    from . import lm
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=64, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    model, tokens = transformers.GPT2LMHeadModel(config).eval(), torch.randint(64, (2048, 32))
    settings = dict(chains=chains, batch_size=16, epsilon=5e-5, gamma=1000.0, nbeta=1000.0, backend="generic",
                    device=device, bf16=bf16)
    lm.estimate(model, tokens, steps=WARM_UP_STEPS, **settings)
    result = lm.estimate(model, tokens, steps=steps, **settings)
    if not all(result.healthy):
        raise RuntimeError("a benchmarked chain produced a non-finite loss")
    name = f"lm generic {'bf16' if bf16 else 'fp32'}"
    return BenchmarkResult(name, chains, steps, result.sampling_seconds, result.chain_steps_per_second)


def run_benchmarks(plan, device, deadline: float, report=print, on_result=lambda results: None):
    """Every (backend, C, T) of ``plan`` until ``deadline`` (time.monotonic()); later ones are recorded as skipped."""
    results = []
    for backend, runs in plan.items():
        for chains, steps, *bf16 in runs:
            name = backend if backend != "lm" else f"lm generic {'bf16' if bf16[0] else 'fp32'}"
            if time.monotonic() > deadline:
                result = BenchmarkResult(name, chains, steps, None, None, "skipped: --budget reached")
            else:
                try:
                    result = (lm_benchmark(chains, steps, bf16[0], device) if backend == "lm" else
                              benchmark(backend, chains, steps, device))
                except Exception as err:  # noqa: BLE001  (reported, and the run fails at the end)
                    result = BenchmarkResult(name, chains, steps, None, None, _one_line(err))
            results.append(result)
            on_result(results)
            if result.chain_steps_per_second is not None:
                report(f"bench {result.backend} C={chains} T={steps}: {result.chain_steps_per_second:,.0f} chain-steps/s "
                       f"({result.seconds:.2f} s)")
            else:
                report(f"bench {result.backend} C={chains} T={steps}: {result.error}")
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
    """Write the JSON atomically (``storage.write_atomically``: a hidden temporary beside it, renamed into place):
    a reader, or a run cut short, sees the previous or the new file, never half; a killed run's temporary is
    one that ``storage.remove_stale_temporaries`` removes."""
    write_atomically(path, json.dumps(content, indent=2) + "\n")


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
        return _run(args, torch.device("cuda"))
    except FastLLCError as err:  # bad arguments, or the summary could not be written (storage's one line)
        print(f"Error: {err}", file=sys.stderr)
        return 1


def _run(args, device) -> int:
    started, env = time.monotonic(), environment()
    print(f"fastllc selfcheck on {env['gpu']} (torch {env['torch']}, CUDA {env['cuda']}, triton {env['triton']})")

    def save(checks, benchmarks):
        if args.out is not None:
            write_summary(args.out, summary(checks, benchmarks, env, time.monotonic() - started))

    checks = run_checks(check_list(device))
    save(checks, [])
    benchmarks = [] if args.no_bench else run_benchmarks(
        {**BENCHMARK_PLAN, "lm": LM_BENCHMARK_PLAN}, device, started + args.budget, on_result=lambda done: save(checks, done))
    status = exit_status(checks, benchmarks)
    failed = sum(not c.passed for c in checks)
    print(f"{len(checks) - failed} of {len(checks)} checks passed in {time.monotonic() - started:.0f} s"
          + (f"; summary in {args.out}" if args.out is not None else ""))
    return status


if __name__ == "__main__":
    sys.exit(main())
