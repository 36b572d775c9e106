"""``python -m fastllc.selfcheck --gpu``: its answer without CUDA, its bookkeeping, and its checks run on CPU."""

import errno
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from fastllc import FastLLCError, conformance, selfcheck, storage


def run_module(*args, env_update=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_update or {})
    return subprocess.run([sys.executable, "-m", "fastllc.selfcheck", *args], env=env, capture_output=True,
                          text=True, timeout=300)


def test_without_cuda_it_says_so_in_one_line_and_succeeds(tmp_path):
    done = run_module("--gpu", "--out", str(tmp_path / "gpu.json"), env_update={"CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr
    assert done.stdout == "no CUDA: nothing to check\n"
    assert list(tmp_path.iterdir()) == []  # nothing to summarise: no file


@pytest.mark.parametrize("args,message", [
    ([], "Error: say what to check: --gpu (the CPU paths are the test suite's: python -m pytest -q)"),
    (["--gpu", "--out", "{tmp}/missing/gpu.json"], "Error: --out: the directory {tmp}/missing does not exist"),
    (["--gpu", "--out", "{tmp}"], "Error: --out: {tmp} is a directory; give a file name"),
])
def test_bad_arguments_are_one_line_errors_before_any_work(tmp_path, capsys, args, message):
    assert selfcheck.main([a.format(tmp=tmp_path) for a in args]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(message.format(tmp=tmp_path)) and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_failed_and_broken_checks_fail_the_run_and_are_written_down(tmp_path):
    def broken():
        raise FastLLCError("the triton backend needs the triton package: pip install 'fastllc[triton]'\nmore")

    lines = []
    checks = selfcheck.run_checks([("within", lambda: 1e-7, 1e-5), ("beyond", lambda: 1e-3, 1e-5),
                                   ("not a number", lambda: math.nan, 1e-5), ("broken", broken, 1e-5)],
                                  report=lines.append)
    assert [c.passed for c in checks] == [True, False, False, False]
    assert checks[3].max_error is None
    assert checks[3].error == "FastLLCError: the triton backend needs the triton package: pip install 'fastllc[triton]'"
    assert lines[0].startswith("ok   within: max error 1.00e-07") and lines[1].startswith("FAIL beyond")
    assert selfcheck.exit_status(checks[:1], []) == 0 and selfcheck.exit_status(checks, []) == 1

    benchmarks = [selfcheck.BenchmarkResult("triton", 64, 2000, 0.5, 256000.0),
                  selfcheck.BenchmarkResult("torch", 4096, 20, None, None, "skipped: --budget reached")]
    assert selfcheck.exit_status(checks[:1], benchmarks) == 0  # out of time is not a failure
    crashed = benchmarks + [selfcheck.BenchmarkResult("torch", 64, 200, None, None, "RuntimeError: CUDA out of memory")]
    assert selfcheck.exit_status(checks[:1], crashed) == 1

    path = tmp_path / "gpu.json"
    selfcheck.write_summary(path, selfcheck.summary(checks, benchmarks, {"gpu": "fake"}, 12.34))
    written = json.loads(path.read_text())
    assert written["passed"] is False and written["environment"] == {"gpu": "fake"} and written["seconds"] == 12.3
    assert written["checks"][1] == dict(name="beyond", passed=False, max_error=1e-3, tolerance=1e-5, error=None)
    assert written["benchmarks"][0] == dict(backend="triton", chains=64, steps=2000, seconds=0.5,
                                            chain_steps_per_second=256000.0, error=None)
    assert list(tmp_path.iterdir()) == [path]  # written atomically: no temporary file left


def test_a_summary_cut_short_leaves_only_a_temporary_the_cleaner_removes(tmp_path, monkeypatch):
    """write_summary is storage's atomic write: a full disk is storage's one-line error naming the file, and what
    a killed run leaves (here: its cleanup skipped) is a temporary that ``remove_stale_temporaries`` finds."""
    def full_disk(path, data):
        path.write_bytes(data[:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage, "_write_file", full_disk)
    monkeypatch.setattr(storage, "remove", lambda path: None)  # as a process killed before it could clean up
    path = tmp_path / "gpu.json"
    with pytest.raises(FastLLCError, match=f"^no space left on device while writing {path}: free space and rerun"):
        selfcheck.write_summary(path, {"passed": True})
    [left] = tmp_path.iterdir()
    assert left.name.startswith(".gpu.json.tmp-")
    monkeypatch.undo()
    monkeypatch.setattr(storage, "pid_alive", lambda pid: False)  # its writer is gone
    assert storage.remove_stale_temporaries(tmp_path) == [left] and list(tmp_path.iterdir()) == []


def test_the_checks_are_conformance_checks_of_every_cuda_backend():
    """selfcheck runs fastllc.conformance's checks (the ones tests/test_conformance.py runs on CPU) of every backend
    that declares CUDA, on every variant, plus each at the published shape; then the language-model path's (generic on
    the causal LM, bf16 against float32); then its own four."""
    cases = conformance.cases("cuda", selfcheck.cuda_backends())
    assert {c.backend for c in cases} == set(selfcheck.cuda_backends()) == {"generic", "torch", "triton"}
    names = [name for name, _, _ in selfcheck.check_list("cuda")]
    assert names[:len(cases)] == [c.name for c in cases]
    lm = [name for name, _, _ in selfcheck.lm_checks("cuda")]
    assert names[len(cases) + len(selfcheck.cuda_backends()):][:len(lm)] == lm
    assert sum("on causal_lm" in name for name in lm) == 3 and "bf16" in lm[-1]
    assert len(names) == len(cases) + len(selfcheck.cuda_backends()) + len(lm) + 4
    tolerances = {name: tolerance for name, _, tolerance in selfcheck.check_list("cuda")}
    assert all(tolerances[c.name] == conformance.TOLERANCE[torch.float32] for c in cases)


def test_a_benchmark_reports_chain_steps_per_second_and_respects_the_budget():
    done = selfcheck.run_benchmarks({"torch": [(4, 3), (8, 3)]}, "cpu", deadline=math.inf, report=lambda line: None)
    assert [(b.backend, b.chains, b.steps, b.error) for b in done] == [("torch", 4, 3, None), ("torch", 8, 3, None)]
    assert done[0].chain_steps_per_second == pytest.approx(12 / done[0].seconds)
    lm = selfcheck.run_benchmarks({"lm": [(2, 3, False), (2, 3, True)]}, "cpu", deadline=math.inf,
                                  report=lambda line: None)
    assert [(b.backend, b.chains, b.error) for b in lm] == [("lm generic fp32", 2, None), ("lm generic bf16", 2, None)]
    assert all(b.chain_steps_per_second > 0 for b in lm)
    late = selfcheck.run_benchmarks({"torch": [(4, 3)]}, "cpu", deadline=-math.inf, report=lambda line: None)
    assert late[0].seconds is None and late[0].error == "skipped: --budget reached"


@pytest.mark.slow
def test_every_check_passes_on_cpu_with_the_triton_interpreter():
    """The GPU check's own code, run where CI can: its checks on device "cpu" (Triton interpreted, tiny cost per
    check), so that a GPU machine's few minutes are not spent finding a typo. The conformance checks at the small
    shape are tests/test_conformance.py's own cases (test above), which it runs in its own process: not again."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is an extra: pip install -e '.[dev]' (or '.[triton]') to test it")
    script = ("import torch\n"
              "torch.set_num_threads(1)\n"
              "from fastllc import conformance, kernels, selfcheck\n"
              "assert kernels.INTERPRETED\n"
              "tested = {case.name for case in conformance.cases('cpu', selfcheck.cuda_backends())}\n"
              "checks = [check for check in selfcheck.check_list('cpu') if check[0] not in tested]\n"
              "results = selfcheck.run_checks(checks, report=lambda line: None)\n"
              "print(sum(r.passed for r in results), len(results))\n"
              "for r in results:\n"
              "    if not r.passed: print(r)\n")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    passed, total = done.stdout.splitlines()[0].split()
    small = conformance.cases("cpu", selfcheck.cuda_backends())
    assert passed == total == str(len(selfcheck.check_list("cpu")) - len(small)), done.stdout  # all the others
    names = [name for name, _, _ in selfcheck.check_list("cpu")]
    assert {name.split()[0] for name in names} == {"torch", "generic", "triton", "fastllc.lm"}  # every CUDA path


@pytest.mark.gpu
def test_every_cuda_path_matches_the_reference(tmp_path):
    """On a GPU machine: the checks themselves (benchmarks are the command's, not the test suite's)."""
    done = run_module("--gpu", "--no-bench", "--out", str(tmp_path / "gpu.json"))
    summary = json.loads((tmp_path / "gpu.json").read_text())
    assert done.returncode == 0 and summary["passed"], done.stdout + done.stderr
