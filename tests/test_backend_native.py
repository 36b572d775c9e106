"""Backend ``native`` (the fused C++ kernel): every build this CPU runs against the reference on every variant
and on shapes that reach every tail of its blocking (``fastllc.conformance``'s checks, which
tests/test_conformance.py runs on the default build); its random streams against CounterRandomness; its builds
against each other; its build and fallback."""

import ctypes
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastllc import FastLLCError, ModularMLP, SGLDConfig, conformance, estimate_llc, make_task
from fastllc import native_build
from fastllc.backends import native, reference, resolve_backend
from fastllc.backends import torch as torch_backend
from fastllc.sampling import InjectedRandomness
from fastllc.sampling.contract import flat_parameters
from fastllc.sampling.randomness import _DENSITY, _EDGES, _EDGES32, _RATIOS, _TAIL, CounterRandomness
from fastllc.sampling.starts import Start

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = native_build.variants()  # those this CPU runs: avx512, avx2 where it has them; scalar always


@pytest.fixture(scope="module", autouse=True)
def kernel_cache(tmp_path_factory):
    """Every test here builds (once) into a private FASTLLC_HOME, never the user's cache."""
    home = tmp_path_factory.mktemp("native-home")
    previous = os.environ.get("FASTLLC_HOME")
    os.environ["FASTLLC_HOME"] = str(home)
    native_build._loaded.clear()
    yield home
    native_build._loaded.clear()
    if previous is None:
        del os.environ["FASTLLC_HOME"]
    else:
        os.environ["FASTLLC_HOME"] = previous


def _workload(p, e, h):
    task = make_task(p, "add", seed=0)
    torch.manual_seed(0)
    return ModularMLP(p, e, h), task.train_data()  # at initialisation: large gradients, a demanding comparison


def _pointer(array, ctype):
    return array.ctypes.data_as(ctypes.POINTER(ctype))


@pytest.mark.parametrize("variant", VARIANTS)
def test_in_kernel_streams_equal_counter_randomness_bit_for_bit(variant):
    lib = native_build.load(variant)
    chains = np.array([0, 3, 17, 1000, 2**40], np.int64)
    C, m, d, n = len(chains), 64, 100_003, 1000  # d: the vector passes' tail too
    for seed in (0, 7, -5, 2**63 - 1):
        for step in (0, 5, 123_456):
            want_idx, want = np.empty((C, m), np.int64), np.empty((C, d), np.float32)
            CounterRandomness(seed, n, m, d).fill(chains, step, want_idx, want)
            got_idx, got = np.empty((C, m), np.int64), np.empty((C, d), np.float32)
            lib.fastllc_draw(C, m, d, n, _pointer(chains, ctypes.c_int64), seed, step,
                             _pointer(_EDGES, ctypes.c_double), _pointer(_EDGES32, ctypes.c_float),
                             _pointer(_RATIOS, ctypes.c_float), _pointer(_DENSITY, ctypes.c_double), _TAIL,
                             _pointer(got_idx, ctypes.c_int64), _pointer(got, ctypes.c_float))
            assert np.array_equal(got_idx, want_idx)
            assert np.array_equal(got.view(np.int32), want.view(np.int32))  # the same bits
            assert np.abs(want).max() > _TAIL  # the ziggurat's tail was drawn too, not only its rectangles


def test_same_seed_gives_the_torch_and_reference_trajectories():
    model, (x, y) = _workload(7, 5, 13)
    config = SGLDConfig(chains=4, steps=30, batch_size=8, seed=7)
    ours = native.sample(model, x, y, F.cross_entropy, config)
    eight = native.sample(model, x, y, F.cross_entropy, SGLDConfig(chains=8, steps=30, batch_size=8, seed=7))
    theirs = torch_backend.sample(model, x, y, F.cross_entropy, config)
    ref = reference.sample(model, x, y, F.cross_entropy, config)
    # one chain's computation does not depend on its neighbours: the same bits
    assert torch.equal(eight.final_params[:4], ours.final_params)
    # the same indices and noise; only fp32 rounding differs: conformance's tolerance for 30 steps
    conformance.assert_follows(ours, theirs, steps=30)
    conformance.assert_follows(ours, ref, steps=30)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "scalar"])
def test_vector_builds_agree_with_the_portable_one(variant):
    model, (x, y) = _workload(11, 5, 13)
    config = SGLDConfig(chains=3, steps=200, batch_size=11, orthogonal=True, seed=3)
    scalar = native.sample(model, x, y, F.cross_entropy, config, variant="scalar")
    vector = native.sample(model, x, y, F.cross_entropy, config, variant=variant)
    # the same streams and formulas; fused multiply-adds round once instead of twice: ~1e-7 per step, 200
    # steps (measured ≤ 1e-6)
    torch.testing.assert_close(vector.final_params, scalar.final_params, rtol=0, atol=2e-5)
    torch.testing.assert_close(vector.loss_trace, scalar.loss_trace, rtol=0, atol=2e-5)
    assert not torch.equal(vector.final_params, scalar.final_params)  # two builds really ran


def test_the_default_is_the_fastest_vector_build_by_timing():
    chosen = native_build.default_variant()
    assert native_build.load()._name == native_build.load(chosen)._name
    vector = [v for v in VARIANTS if v != "scalar"]
    assert chosen in (vector or ["scalar"])
    if len(vector) > 1:  # timed once, the choice kept beside the builds (tests/test_native_build.py: its reuse)
        import json
        record = json.loads(native_build.choice_path(native_build.compiler()).read_text())
        assert record["variant"] == chosen and sorted(record["us_per_chain_step"]) == sorted(vector)
        assert record["us_per_chain_step"][chosen] == min(record["us_per_chain_step"].values())


def test_stacked_starting_points_equal_separate_runs():
    model, (x, y) = _workload(7, 5, 13)
    other = ModularMLP(7, 5, 13)
    d, steps, m = flat_parameters(model)[2].numel(), 40, 8
    noise = InjectedRandomness.seeded(4, steps, len(y), m, d, seed=4)
    config = SGLDConfig(chains=2, steps=steps, batch_size=m, orthogonal=True)
    together = native.sample_starts([Start(model, x, y), Start(other, x, y)], config, randomness=noise)
    alone = native.sample(other, x, y, F.cross_entropy, config,
                          randomness=InjectedRandomness(noise.indices[2:], noise.noise[2:]))
    assert torch.equal(together[1].final_params, alone.final_params)  # per-chain computation: the same bits
    assert torch.equal(together[1].loss_trace, alone.loss_trace)
    assert together[1].init_loss == pytest.approx(F.cross_entropy(other(x), y).item(), rel=1e-6)
    assert together[0].chains_in_batch == 4


def test_diverging_chain_is_flagged_and_stops_where_it_blew_up():
    model, (x, y) = _workload(7, 5, 13)
    samples = native.sample(model, x, y, F.cross_entropy,
                            SGLDConfig(chains=2, steps=200, epsilon=[1e-4, 30.0], nbeta=100.0, batch_size=8))
    first_bad = int((~torch.isfinite(samples.loss_trace[1])).nonzero()[0])
    assert torch.isnan(samples.loss_trace[1, first_bad:]).all() and torch.isfinite(samples.loss_trace[0]).all()
    with pytest.warns(RuntimeWarning, match="1 of 2 chains"):
        result = estimate_llc(samples, SGLDConfig(chains=2, steps=200))
    assert result.healthy == [True, False]
    assert math.isfinite(result.llc_mean)


def test_loss_stays_exact_when_a_label_probability_underflows():
    model, _ = _workload(7, 5, 13)
    with torch.no_grad():
        model.unembed.weight.mul_(2000.0)
    m = 11
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randint(7, (m, 2), generator=gen), torch.randint(7, (m,), generator=gen)
    d = flat_parameters(model)[2].numel()
    injected = InjectedRandomness(torch.arange(m).view(1, 1, m), torch.zeros(1, 1, d))
    samples = native.sample(model, x, y, F.cross_entropy, SGLDConfig(chains=1, steps=1, batch_size=m),
                            randomness=injected)
    expected = F.cross_entropy(model(x), y)
    assert (torch.softmax(model(x), -1).gather(-1, y.unsqueeze(-1)) < 1e-30).any()  # the case at hand
    assert expected.item() > 100
    assert samples.loss_trace[0, 0].item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_transcendentals_keep_their_documented_error_bounds(variant):
    lib = native_build.load(variant)
    x = np.concatenate([np.linspace(-87, 0, 200_000), np.linspace(0, 88, 200_000)]).astype(np.float32)
    got = np.empty_like(x)
    lib.fastllc_exp(len(x), _pointer(x, ctypes.c_float), _pointer(got, ctypes.c_float))
    exact = np.exp(x.astype(np.float64))
    assert (np.abs(got - exact) / np.spacing(exact.astype(np.float32))).max() <= 2  # ulp (measured 1.27)

    z = np.linspace(-20, 20, 400_000).astype(np.float32)
    value, slope = np.empty_like(z), np.empty_like(z)
    lib.fastllc_gelu(len(z), _pointer(z, ctypes.c_float), _pointer(value, ctypes.c_float),
                     _pointer(slope, ctypes.c_float))
    zd = torch.from_numpy(z).double()
    cdf = 0.5 * torch.erfc(-zd / math.sqrt(2))
    gelu, gelu_slope = (zd * cdf).numpy(), (cdf + zd * torch.exp(-zd * zd / 2) / math.sqrt(2 * math.pi)).numpy()
    # the bounds stated in mlp_sgld_cpu.cpp (measured: 3.8e-7; relative 7.1e-7 and 2.1e-6, in the portable
    # build, which rounds exp's argument twice, 7.8e-7 and 2.9e-6; 2.0e-7)
    assert np.abs(value - gelu).max() <= 4e-7
    for limit, bound in ((5, 1.5e-6), (10, 5e-6)) if variant == "scalar" else ((5, 1e-6), (10, 2.5e-6)):
        inside = np.abs(z) <= limit
        assert (np.abs(value - gelu)[inside] / np.abs(gelu)[inside].clip(1e-38)).max() <= bound
    assert np.abs(slope - gelu_slope).max() <= 2.5e-7


def test_other_models_devices_and_generators_are_refused_in_one_line():
    with pytest.raises(FastLLCError, match="ModularMLP with cross-entropy"):
        native.sample(torch.nn.Linear(2, 2), torch.randn(4, 2), torch.zeros(4, dtype=torch.long),
                      F.cross_entropy, SGLDConfig(chains=1, steps=1))
    with pytest.raises(FastLLCError, match="^the native backend runs on the CPU, not cuda; use --backend torch or triton$"):
        native.require("cuda")
    model, (x, y) = _workload(5, 4, 8)

    class OwnGenerator:
        def fill(self, *args):
            pass

    with pytest.raises(FastLLCError, match="draws CounterRandomness's streams or reads InjectedRandomness, not "
                                           "OwnGenerator"):
        native.sample(model, x, y, F.cross_entropy, SGLDConfig(chains=1, steps=1), randomness=OwnGenerator())
    with pytest.raises(FastLLCError, match="^the native backend does not record the MALA acceptance; use --backend "
                                           "generic for mala$"):
        native.sample(model, x, y, F.cross_entropy, SGLDConfig(chains=1, steps=1, mala=True))


def test_auto_picks_native_for_the_study_mlp_on_the_cpu_only():
    assert resolve_backend("auto", torch.device("cpu")) == "native"
    assert resolve_backend("auto", torch.device("cpu"), ModularMLP(5, 4, 16), F.cross_entropy) == "native"
    assert resolve_backend("auto", torch.device("cpu"), torch.nn.Linear(3, 2), F.cross_entropy) == "generic"
    assert not native.supports(ModularMLP(5, 4, 16), F.cross_entropy, "cuda")


@pytest.fixture
def no_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTLLC_CXX", str(tmp_path / "nonexistent-g++"))
    monkeypatch.setenv("FASTLLC_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(native, "_notice_given", False)
    return tmp_path


def test_without_a_compiler_auto_falls_back_to_torch_with_one_notice(no_compiler, capsys):
    model = ModularMLP(5, 4, 16)
    assert resolve_backend("auto", torch.device("cpu"), model, F.cross_entropy) == "torch"
    assert resolve_backend("auto", torch.device("cpu"), model, F.cross_entropy) == "torch"
    err = capsys.readouterr().err
    assert err == (f"fastllc: the native backend is unavailable (the C++ compiler FASTLLC_CXX="
                   f"{no_compiler / 'nonexistent-g++'} was not found; point FASTLLC_CXX at g++ or clang++); "
                   "using the next backend\n")  # one line, once
    assert not (no_compiler / "home").exists()  # nothing left behind


def test_without_a_compiler_an_explicit_native_is_a_one_line_error(no_compiler):
    from click.testing import CliRunner
    from fastllc.cli import main
    result = CliRunner().invoke(main, ["estimate", "--p", "5", "--backend", "native"])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and result.output.startswith(
        "Error: the native backend is unavailable: the C++ compiler FASTLLC_CXX=")
    assert result.output.endswith("point FASTLLC_CXX at g++ or clang++; or use --backend torch\n")
    assert not (no_compiler / "home").exists()  # refused before training anything


def test_a_failing_compiler_is_a_one_line_error_and_leaves_only_its_reason(monkeypatch, tmp_path):
    broken = tmp_path / "broken-g++"
    broken.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo broken 1.0; exit 0; fi\n"
                      "echo 'x.cpp:1:1: error: no such luck' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("FASTLLC_CXX", str(broken))
    monkeypatch.setenv("FASTLLC_HOME", str(tmp_path / "home"))
    reason = (f"building the native kernel ({native_build.variant()}) with {broken} failed: "
              "x.cpp:1:1: error: no such luck")  # the best build's error: every build failed
    with pytest.raises(FastLLCError, match=f"^{re.escape(f'the native backend is unavailable: {reason}; or use --backend torch')}$"):
        native.require("cpu")
    files = sorted(p.name for p in (tmp_path / "home").rglob("*") if p.is_file())
    assert files == sorted(f"libmlp_sgld_{v}.failed" for v in native_build.variants())  # no library, no temporary
    monkeypatch.setattr(native_build, "_loaded", {})
    with pytest.raises(FastLLCError, match=f"^{re.escape(f'the native backend is unavailable: {reason}')} "
                                           r"\(remembered; delete .*\.failed to try again\); or use --backend torch$"):
        native.require("cpu")  # a later process: the same line, without compiling again


def test_a_compiler_without_avx512_falls_back_to_the_next_build(monkeypatch, tmp_path, real_cxx):
    real = real_cxx
    picky = tmp_path / "no-avx512-g++"  # as an old compiler: refuses the AVX-512 flags, builds the rest
    calls = tmp_path / "calls"  # one line per compile (not per --version) with the AVX-512 flags
    picky.write_text(f"#!/bin/sh\ncase \"$*\" in *-mavx512f*) echo x >> {calls}; "
                     f"echo 'error: unknown flag -mavx512f' >&2; exit 1;; esac\nexec {real} \"$@\"\n")
    picky.chmod(0o755)
    monkeypatch.setenv("FASTLLC_CXX", str(picky))
    monkeypatch.setenv("FASTLLC_HOME", str(tmp_path / "home"))  # nothing cached: both builds are attempted
    monkeypatch.setattr(native_build, "_loaded", {})
    monkeypatch.setattr(native_build, "variants", lambda: ["avx512", "scalar"])  # any CPU runs the scalar build
    assert native_build.load().fastllc_mlp_sgld_variant() == b"scalar"
    files = sorted(p.name for p in (tmp_path / "home").rglob("*") if p.is_file())
    assert files == ["libmlp_sgld_avx512.failed", "libmlp_sgld_scalar.sha256", "libmlp_sgld_scalar.so"]  # remembered
    monkeypatch.setattr(native_build, "_loaded", {})  # as a new process: falls back without compiling again
    assert native_build.load().fastllc_mlp_sgld_variant() == b"scalar"
    assert calls.read_text().count("x") == 1
    with pytest.raises(native_build.NativeUnavailable, match=r"^building the native kernel \(avx512\) with .* failed: "
                       r"error: unknown flag -mavx512f \(remembered; delete .*libmlp_sgld_avx512.failed to try again\)$"):
        native_build.load("avx512")


def test_two_processes_building_at_once_leave_one_whole_library(tmp_path):
    home = tmp_path / "home"
    script = ("from fastllc import native_build as nb; lib = nb.load('scalar'); "
              "print(lib.fastllc_mlp_sgld_variant().decode())")
    env = {**os.environ, "FASTLLC_HOME": str(home), "PYTHONPATH": str(ROOT)}
    builders = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [b.communicate(timeout=300) for b in builders]
    assert [b.returncode for b in builders] == [0, 0], outputs
    assert [out for out, _ in outputs] == ["scalar\n", "scalar\n"]
    files = sorted(p for p in home.rglob("*") if p.is_file())
    assert [p.name for p in files] == ["libmlp_sgld_scalar.sha256", "libmlp_sgld_scalar.so"]  # no temporaries left
    assert native_build.verified(files[1])  # one library, whole: its checksum matches, and it loads and runs
    lib = ctypes.CDLL(str(files[1]))
    lib.fastllc_mlp_sgld_variant.restype = ctypes.c_char_p
    assert lib.fastllc_mlp_sgld_variant() == b"scalar"


def test_progress_runs_the_kernel_in_chunks_with_the_same_result():
    model, (x, y) = _workload(5, 4, 8)
    config = SGLDConfig(chains=3, steps=250, batch_size=8, seed=2)
    whole = native.sample(model, x, y, F.cross_entropy, config)
    ticked = native.sample(model, x, y, F.cross_entropy, config, progress=True)  # 100 calls of 2 or 3 steps
    assert torch.equal(ticked.final_params, whole.final_params) and torch.equal(ticked.loss_trace, whole.loss_trace)


def _confident(p, e, h, scale):
    """The workload with its output weights scaled up: confident logits, some minibatch p_y below 1e-6."""
    model, data = _workload(p, e, h)
    with torch.no_grad():
        model.unembed.weight.mul_(scale)
    return model, data


def _selection(d, chains=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(d if chains is None else (chains, d), generator=gen) < 0.3


@pytest.mark.parametrize("orthogonal", [False, True])
def test_per_chain_masks_equal_separate_runs_with_each_mask(orthogonal):
    p, e, h, m = conformance.SHAPE
    model, (x, y) = _workload(p, e, h)
    w_star = flat_parameters(model)[2]
    d, chains, steps = w_star.numel(), 3, 40
    noise = InjectedRandomness.seeded(chains, steps, len(y), m, d, seed=7)
    keep = _selection(d, chains, seed=1)
    config = SGLDConfig(chains=chains, steps=steps, batch_size=m, orthogonal=orthogonal, epsilon=[1e-3, 2e-3, 5e-4])
    together = native.sample(model, x, y, F.cross_entropy, config, randomness=noise, restrict=keep)
    for c in range(chains):
        alone = native.sample(model, x, y, F.cross_entropy,
                              SGLDConfig(chains=1, steps=steps, batch_size=m, orthogonal=orthogonal,
                                         epsilon=config.epsilon[c]),
                              randomness=InjectedRandomness(noise.indices[c:c + 1], noise.noise[c:c + 1]),
                              restrict=keep[c])
        assert torch.equal(together.final_params[c], alone.final_params[0])  # per-chain computation: the same bits
        assert torch.equal(together.loss_trace[c], alone.loss_trace[0])
        assert torch.equal(together.final_params[c, ~keep[c]], w_star[~keep[c]])


def test_bad_restrictions_are_one_line_errors():
    model, (x, y) = _workload(5, 4, 8)
    d = flat_parameters(model)[2].numel()
    config = SGLDConfig(chains=2, steps=2, batch_size=4)
    shape = f"^restrict must reach the backend as a bool tensor of shape \\({d},\\) or \\(2, {d}\\) over the flat weights"
    for bad in (torch.ones(d - 1, dtype=torch.bool), torch.ones(3, d, dtype=torch.bool), torch.ones(d),
                [True] * d):
        with pytest.raises(FastLLCError, match=shape):
            native.sample(model, x, y, F.cross_entropy, config, restrict=bad)
    with pytest.raises(FastLLCError, match="^restrict selects no weights; select at least one weight, or drop restrict$"):
        native.sample(model, x, y, F.cross_entropy, config, restrict=torch.zeros(d, dtype=torch.bool))
    rows = torch.ones(2, d, dtype=torch.bool)
    rows[1] = False
    with pytest.raises(FastLLCError, match="^restrict selects no weights for chain 1; select at least one weight"):
        native.sample(model, x, y, F.cross_entropy, config, restrict=rows)


@pytest.mark.parametrize("build", VARIANTS)
@pytest.mark.parametrize("variant", conformance.variants("native"))
def test_every_build_follows_the_reference(variant, build):
    """conformance's check of every variant (tests/test_conformance.py runs it on the default build) on each build."""
    outcome = conformance.check(conformance.Case("native", variant), variant=build)
    assert outcome.passed(), f"{build}: {outcome}"


@pytest.mark.parametrize("build", VARIANTS)
@pytest.mark.parametrize("shape", [(3, 1, 1, 1), (5, 9, 17, 5), (31, 12, 7, 33), (7, 3, 40, 70),
                                   conformance.PUBLISHED_SHAPE], ids=str)
def test_odd_shapes_follow_the_reference(shape, build):
    """Shapes that reach every tail of the kernel's blocking: one example, hidden and embedding widths below,
    at and above one vector, minibatches that end in a block of 16 examples, of 8, and with padding lanes; and
    the published shape. conformance's check of orthogonal SGLD, on each build."""
    outcome = conformance.check(conformance.Case("native", "orthogonal", shape=shape), variant=build)
    assert outcome.passed(), f"{build}: {outcome}"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("flush", [False, True])
def test_a_run_leaves_the_callers_floating_point_mode_as_it_was(flush, variant):
    """The kernel flushes subnormals (FTZ/DAZ) in each of its threads and restores every thread's mode after:
    the caller's mode, flushing or not, is the same after a run, and so is its arithmetic on subnormals."""
    lib = native_build.load(variant)
    model, (x, y) = _confident(7, 5, 13, 40.0)  # confident logits: subnormal probabilities inside the kernel
    supported = torch.set_flush_denormal(flush)  # False where the CPU has no such mode (then nothing to check)
    try:
        mode = 0xFFC0  # MXCSR's control bits (the low six are sticky exception flags any arithmetic sets)
        before = lib.fastllc_fp_mode() & mode
        pool = np.zeros(2, np.uint32)  # the OpenMP pool's threads: the kernel's team, reused by later regions
        lib.fastllc_fp_modes(2, _pointer(pool, ctypes.c_uint))
        pool_before = pool & mode
        native.sample(model, x, y, F.cross_entropy, SGLDConfig(chains=4, steps=20, batch_size=8), variant=variant,
                      threads=2)
        assert lib.fastllc_fp_mode() & mode == before
        lib.fastllc_fp_modes(2, _pointer(pool, ctypes.c_uint))
        assert np.array_equal(pool & mode, pool_before)
        subnormal = (torch.tensor([1e-38]) * torch.tensor([0.01])).item()
        assert (subnormal == 0.0) == (flush and supported)
        if supported:  # x86: the mode is MXCSR, FTZ (bit 15) and DAZ (bit 6) as the caller chose
            assert (before & 0x8040 == 0x8040) == flush
    finally:
        torch.set_flush_denormal(False)
