"""The native kernel's cache (fastllc/native_build.py) recovers from what the environment does to it: a damaged
cached library is rebuilt, not run; a full disk, a killed or starved compiler are not remembered as the
compiler's verdict; a build killed midway leaves nothing behind once the next one runs. The default build is
the fastest by a short timing, kept beside the builds."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fastllc import native_build

ROOT = Path(__file__).resolve().parents[1]
LOAD_AND_RUN = ("from fastllc import native_build as nb; lib = nb.load('scalar'); "
                "print(lib.fastllc_mlp_sgld_variant().decode())")


def _fake_compiler(tmp_path: Path, real: str, body: str) -> Path:
    """A compiler script that answers --version as the real one (so the cache key is the real one's) and
    otherwise runs ``body`` (sh; "$@" are the compile's arguments, $REAL the real compiler)."""
    script = tmp_path / "fake-g++"
    script.write_text(f"#!/bin/sh\nREAL={real}\n"
                      "if [ \"$1\" = --version ]; then exec $REAL --version; fi\n" + body)
    script.chmod(0o755)
    return script


def _files(home: Path) -> list[str]:
    return sorted(p.name for p in home.rglob("*") if p.is_file())


def _fresh_process(home: Path, cxx: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "FASTLLC_HOME": str(home), "PYTHONPATH": str(ROOT)}
    if cxx:
        env["FASTLLC_CXX"] = cxx
    return subprocess.run([sys.executable, "-c", LOAD_AND_RUN], env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def home(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTLLC_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FASTLLC_CXX", raising=False)
    monkeypatch.setattr(native_build, "_loaded", {})
    return tmp_path / "home"


@pytest.mark.parametrize("damage", ["truncated", "code bytes changed", "checksum missing"])
def test_a_damaged_cached_library_is_rebuilt_not_run(home, damage, real_cxx):
    first = _fresh_process(home)
    assert first.returncode == 0 and first.stdout == "scalar\n", first.stderr
    library = next(home.rglob("libmlp_sgld_scalar.so"))
    assert _files(home) == ["libmlp_sgld_scalar.sha256", "libmlp_sgld_scalar.so"]
    whole = library.read_bytes()
    if damage == "truncated":  # a copy interrupted
        library.write_bytes(whole[: len(whole) // 2])
    elif damage == "code bytes changed":  # the same size: only the checksum can tell
        middle = len(whole) // 2
        library.write_bytes(whole[:middle] + bytes(b ^ 0xFF for b in whole[middle:middle + 4096]) + whole[middle + 4096:])
    else:  # the checksum lost (deleted by hand, or a library copied in without it)
        native_build.checksum_path(library).unlink()
    later = _fresh_process(home)  # before: SIGBUS (rc 135) or SIGTRAP (rc 133), no message
    assert later.returncode == 0 and later.stdout == "scalar\n", later.stderr
    assert later.stderr == (f"fastllc: the cached native kernel {library} is damaged or incomplete (its checksum "
                            "does not match); rebuilding it\n")
    assert library.read_bytes() == whole  # rebuilt whole
    assert _files(home) == ["libmlp_sgld_scalar.sha256", "libmlp_sgld_scalar.so"]  # nothing else left
    again = _fresh_process(home)
    assert again.returncode == 0 and again.stderr == ""  # verified: loaded without a word


def test_a_full_disk_during_the_first_compile_is_not_remembered(home, tmp_path, monkeypatch, real_cxx):
    full = tmp_path / "disk-full"
    full.touch()
    cxx = _fake_compiler(tmp_path, real_cxx, f"if [ -e {full} ]; then\n"
                         "  echo '/usr/bin/ld: final link failed: No space left on device' >&2\n"
                         "  echo 'collect2: error: ld returned 1 exit status' >&2; exit 1\nfi\nexec $REAL \"$@\"\n")
    monkeypatch.setenv("FASTLLC_CXX", str(cxx))
    cache = native_build.library_path("scalar", str(cxx)).parent
    with pytest.raises(native_build.NativeUnavailable) as caught:
        native_build.load("scalar")
    assert str(caught.value) == (f"building the native kernel (scalar) ran out of disk space (its cache {cache}, or "
                                 f"the compiler's temporaries in {tempfile.gettempdir()}): free space there and rerun")
    assert _files(home) == []  # no .failed: not the compiler's verdict
    full.unlink()  # space freed: the next process builds
    later = _fresh_process(home, str(cxx))
    assert later.returncode == 0 and later.stdout == "scalar\n", later.stderr
    assert _files(home) == ["libmlp_sgld_scalar.sha256", "libmlp_sgld_scalar.so"]


@pytest.mark.parametrize("failure,body", [
    ("out of memory", "echo 'cc1plus: out of memory allocating 65536 bytes' >&2; exit 1\n"),
    ("a killed cc1plus", "echo 'g++: fatal error: Killed signal terminated program cc1plus' >&2\n"
                         "echo 'compilation terminated.' >&2; exit 1\n"),
    ("the compiler killed", "kill -9 $$\n"),
])
def test_environment_failures_of_the_compiler_are_not_remembered(home, tmp_path, monkeypatch, failure, body,
                                                                 real_cxx):
    monkeypatch.setenv("FASTLLC_CXX", str(_fake_compiler(tmp_path, real_cxx, body)))
    with pytest.raises(native_build.NativeUnavailable, match=r"^building the native kernel \(scalar\) with .* failed: "):
        native_build.load("scalar")
    assert _files(home) == []  # nothing remembered, no temporary


def test_an_older_remembered_environment_failure_is_retried(home, tmp_path, monkeypatch, real_cxx):
    cxx = _fake_compiler(tmp_path, real_cxx, "exec $REAL \"$@\"\n")
    monkeypatch.setenv("FASTLLC_CXX", str(cxx))
    failed = native_build.library_path("scalar", str(cxx)).with_suffix(".failed")
    failed.parent.mkdir(parents=True)
    failed.write_text("building the native kernel (scalar) with g++ failed: /usr/bin/ld: final link failed: "
                      "No space left on device\n")  # as fastllc before this fix recorded a full disk
    assert native_build.load("scalar").fastllc_mlp_sgld_variant() == b"scalar"
    assert _files(home) == ["libmlp_sgld_scalar.sha256", "libmlp_sgld_scalar.so"]


def test_a_build_killed_midway_leaves_nothing_once_the_next_build_runs(home, tmp_path, real_cxx):
    started = tmp_path / "started"
    cxx = _fake_compiler(tmp_path, real_cxx, "for a in \"$@\"; do out=$a; done\n"  # the last argument: -o's temporary
                         f"head -c 50000 /dev/zero > \"$out\"; touch {started}; sleep 300\n")
    env = {**os.environ, "FASTLLC_HOME": str(home), "PYTHONPATH": str(ROOT), "FASTLLC_CXX": str(cxx)}
    builder = subprocess.Popen([sys.executable, "-c", LOAD_AND_RUN], env=env, start_new_session=True)
    deadline = time.monotonic() + 120
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert started.exists()
    os.killpg(builder.pid, signal.SIGKILL)  # the process and its compiler, as a user's kill -9 of the job
    builder.wait(timeout=60)
    assert any(".tmp-" in name for name in _files(home))  # the half-written library of the killed build
    later = _fresh_process(home)  # the real compiler, the same cache key
    assert later.returncode == 0 and later.stdout == "scalar\n", later.stderr
    assert _files(home) == ["libmlp_sgld_scalar.sha256", "libmlp_sgld_scalar.so"]


VECTOR_BUILDS = [v for v in native_build.variants() if v != "scalar"]


@pytest.mark.skipif(len(VECTOR_BUILDS) < 2, reason="this CPU runs one vector build: nothing to choose")
def test_the_default_build_is_timed_once_and_the_choice_kept(home, monkeypatch):
    chosen = native_build.default_variant()  # builds every vector build, times them, records the fastest
    record = json.loads(native_build.choice_path(native_build.compiler()).read_text())
    assert record["variant"] == chosen and set(record["us_per_chain_step"]) == set(VECTOR_BUILDS)
    assert record["cpu"] == native_build.cpu_name()
    monkeypatch.setattr(native_build, "_loaded", {})  # a later process: the recorded choice, no timing

    def no_timing(*args, **kwargs):
        raise AssertionError("timed again")

    monkeypatch.setattr(native_build, "time_variants", no_timing)
    assert native_build.default_variant() == chosen
    other = next(v for v in VECTOR_BUILDS if v != chosen)
    monkeypatch.setenv(native_build.VARIANT_ENV, other)  # the override
    assert native_build.default_variant() == other


def test_a_variant_named_in_the_environment_is_checked(home, monkeypatch):
    monkeypatch.setenv(native_build.VARIANT_ENV, "avx1024")
    with pytest.raises(native_build.NativeUnavailable, match=r"^FASTLLC_NATIVE_VARIANT=avx1024 is not a build of "
                                                              r"the native kernel; use one of .*scalar$"):
        native_build.load()
    monkeypatch.setattr(native_build, "variants", lambda: ["scalar"])  # a CPU without AVX2
    monkeypatch.setenv(native_build.VARIANT_ENV, "avx2")
    with pytest.raises(native_build.NativeUnavailable, match=r"^this CPU does not run the avx2 build of the native "
                                                              r"kernel \(it runs scalar\)$"):
        native_build.load()
    assert not home.exists()  # refused before building anything


def test_the_kernels_ctypes_table_names_the_cpp_signatures_parameters_in_order():
    """``native_build.RUN_PARAMETERS`` declares and calls ``fastllc_mlp_sgld_run``: its names are the C++
    parameters' names, in order, with matching pointer/scalar kinds (so a call by name cannot shift an argument)."""
    import ctypes
    import re
    source = (Path(native_build.__file__).parent / "kernels" / "mlp_sgld_cpu.cpp").read_text()
    signature = re.search(r"int fastllc_mlp_sgld_run\(([^)]*)\)", source).group(1)
    parameters = [" ".join(p.split()) for p in signature.split(",")]
    names = [re.search(r"(\w+)$", p).group(1) for p in parameters]
    assert names == [name for name, _ in native_build.RUN_PARAMETERS]
    for text, (name, ctype) in zip(parameters, native_build.RUN_PARAMETERS):
        assert ("*" in text) == issubclass(ctype, ctypes._Pointer), name


def test_a_call_with_a_missing_or_mistyped_argument_is_refused_before_the_kernel_runs():
    import numpy as np
    arguments = {name: None for name, _ in native_build.RUN_PARAMETERS}
    with pytest.raises(TypeError, match="wrong parameters"):
        native_build.call(None, **{k: v for k, v in arguments.items() if k != "seed"})
    with pytest.raises(TypeError, match="w must be a contiguous c_float array"):
        native_build.call(None, **{**arguments, "w": np.zeros(3, np.float64)})
