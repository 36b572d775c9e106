"""Compiling and loading the native CPU kernels on first use: the MLP kernel (``fastllc/kernels/mlp_sgld_cpu.cpp``, what
this docstring describes) and, by ``build(which, source)``, the transformer engine's fused passes
(``fastllc/kernels/transformer_cpu.cpp``, loaded by ``fastllc/engines/transformer_cpu.py``).

The kernel is plain C++17 with OpenMP, built by the system compiler (``$FASTLLC_CXX``, else ``g++``, else
``c++``) into ``FASTLLC_HOME/native/<key>/``, where the key hashes the source, the compiler's identity
(its ``--version``) and the flags: a new source, compiler or flag set never loads a stale library. Three
variants come from the one source: ``scalar`` (portable flags), ``avx2`` (``-mavx2 -mfma``, x86-64 CPUs
with AVX2 and FMA) and ``avx512`` (AVX2 plus AVX-512 F/DQ/VL/BW: the noise's 64-bit hashing in 64-bit
lanes, and the products in 512-bit vectors); ``variants()`` lists those this CPU runs. The default build is
the fastest of the vector builds this CPU runs, by a short timing at first use (``time_variants``: the
widest instruction set is not always the fastest, e.g. where 512-bit FMAs run as two 256-bit halves), kept
in ``choice-<key>.json`` beside the builds; ``$FASTLLC_NATIVE_VARIANT`` or ``load(variant)`` overrides it.
The portable build is used only when no vector build builds. Fixed flags, not ``-march=native``: the
library in a shared cache never depends on which machine built it.

Concurrency: each build writes a temporary of this process's own name and renames it into place
(``os.replace``, atomic), so two processes building at once each produce a whole library and the cache
holds one of them; a process that loaded a library keeps its (unlinked) inode. The library's sha256 is
recorded beside it before the rename (``libmlp_sgld_<variant>.sha256``) and checked before every load: a
library truncated or with damaged bytes (which would crash the process when run) or without its checksum is
rebuilt, with one line on stderr. Temporaries of builds whose process was killed are removed by the next build.

A failed build says why in one line (``NativeUnavailable``). When the compiler itself rejected the source or
flags, that line is also kept beside the cache entry (``libmlp_sgld_<variant>.failed``), so that later
processes fall back at once instead of compiling again (delete the file to retry); a failure of the
environment (a full disk, named as such with the cache directory; a compiler killed or out of memory) is
not kept: the next run compiles again.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .errors import FastLLCError
from .storage import fastllc_home, remove, remove_stale_temporaries, temporary_sibling, write_atomically

SOURCE = Path(__file__).with_name("kernels") / "mlp_sgld_cpu.cpp"
COMMON_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off")
VARIANT_FLAGS = {"scalar": (), "avx2": ("-mavx2", "-mfma"),
                 "avx512": ("-mavx2", "-mfma", "-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw")}
# the /proc/cpuinfo flags each variant needs (scalar: none)
VARIANT_CPU_FLAGS = {"scalar": set(), "avx2": {"avx2", "fma"},
                     "avx512": {"avx2", "fma", "avx512f", "avx512dq", "avx512vl", "avx512bw"}}
BUILD_TIMEOUT_S = 300


class NativeUnavailable(FastLLCError):
    """The native kernel cannot be built or loaded here (one line: why, and what to do)."""


def compiler() -> str:
    """The C++ compiler to use: $FASTLLC_CXX (a path or a name on PATH), else g++, else c++."""
    chosen = os.environ.get("FASTLLC_CXX")
    if chosen:
        found = shutil.which(chosen)
        if not found:
            raise NativeUnavailable(f"the C++ compiler FASTLLC_CXX={chosen} was not found; "
                                    "point FASTLLC_CXX at g++ or clang++")
        return found
    for name in ("g++", "c++"):
        found = shutil.which(name)
        if found:
            return found
    raise NativeUnavailable("no C++ compiler found (g++ or c++ on PATH); install one (e.g. apt install g++) "
                            "or set FASTLLC_CXX")


@functools.lru_cache(maxsize=None)
def _compiler_identity(path: str) -> str:
    try:
        done = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise NativeUnavailable(f"the C++ compiler {path} does not run ({err}); set FASTLLC_CXX to a working one")
    return done.stdout.strip()


def cpu_flags() -> set[str]:
    """This CPU's feature flags (Linux's /proc/cpuinfo; empty elsewhere and off x86-64)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return set()
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return set()
    return set(flags.split())


def variants() -> list[str]:
    """The variants this CPU runs, widest first: ``avx512``, ``avx2`` where it has their features; ``scalar`` always."""
    flags = cpu_flags()
    return [name for name in ("avx512", "avx2", "scalar") if VARIANT_CPU_FLAGS[name] <= flags]


def variant() -> str:
    """The widest variant this CPU runs (by its instruction sets; the default of ``load`` is chosen by timing)."""
    return variants()[0]


def cpu_name() -> str:
    """This CPU's model name (Linux's /proc/cpuinfo), else what the platform says."""
    try:
        line = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), "")
    except OSError:
        line = ""
    return line.partition(":")[2].strip() or platform.processor() or platform.machine()


def library_path(which: str, cxx: str, source: Path = SOURCE) -> Path:
    """Where the cached library of ``source`` (default: the MLP kernel) in variant ``which`` built by ``cxx`` lives
    (the key: source, compiler, flags)."""
    flags = (*COMMON_FLAGS, *VARIANT_FLAGS[which])
    key = hashlib.sha256(b"\0".join([source.read_bytes(), _compiler_identity(cxx).encode(),
                                     " ".join(flags).encode()])).hexdigest()[:20]
    return fastllc_home() / "native" / key / f"lib{_stem(source)}_{which}.so"


def _stem(source: Path) -> str:
    """The library's name: ``mlp_sgld`` for the MLP kernel (its name since the first build), else the source's."""
    return "mlp_sgld" if source == SOURCE else source.stem


def checksum_path(path: Path) -> Path:
    """The sidecar holding the sha256 of the library at ``path``, written once the library is whole."""
    return path.with_suffix(".sha256")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def verified(path: Path) -> bool:
    """Whether the cached library at ``path`` is the one its build wrote (its sha256 as recorded). A library
    truncated or with damaged code bytes would otherwise crash the process (SIGBUS, SIGTRAP) when run."""
    try:
        return checksum_path(path).read_text().strip() == _digest(path)
    except OSError:
        return False


# Words in a failed compile's output that mean the environment failed, not the compiler judging the source:
# such a failure is not remembered (the next run compiles again once space, memory or time is back).
ENVIRONMENT_FAILURES = ("no space left on device", "disk quota exceeded", "killed", "signal terminated program",
                        "out of memory", "cannot allocate memory", "virtual memory exhausted",
                        "memory exhausted", "resource temporarily unavailable", "read-only file system",
                        "input/output error")
_NO_SPACE = ("no space left on device", "disk quota exceeded")


def _no_space(cache: Path, which: str) -> NativeUnavailable:
    return NativeUnavailable(f"building the native kernel ({which}) ran out of disk space (its cache {cache}, or the "
                             f"compiler's temporaries in {tempfile.gettempdir()}): free space there and rerun")


def build(which: str, source: Path = SOURCE) -> Path:
    """The library of ``source`` (default: the MLP kernel) in variant ``which``, compiled now unless already cached
    and verified; NativeUnavailable if it cannot be. A cached library whose checksum does not match is rebuilt (one
    line on stderr)."""
    cxx = compiler()
    path = library_path(which, cxx, source)
    if path.is_file():
        if verified(path):
            return path
        print(f"fastllc: the cached native kernel {path} is damaged or incomplete (its checksum does not match); "
              "rebuilding it", file=sys.stderr)
        remove(path)
        remove(checksum_path(path))
    failed = path.with_suffix(".failed")
    if failed.is_file():
        reason = failed.read_text().strip()
        if not any(word in reason.lower() for word in ENVIRONMENT_FAILURES):
            raise NativeUnavailable(f"{reason} (remembered; delete {failed} to try again)")
        remove(failed)  # an environment failure recorded by an older fastllc: try again
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _no_space(path.parent, which)
        raise NativeUnavailable(f"cannot write the native kernel cache {path.parent} ({err.strerror}); "
                                "set FASTLLC_HOME to a writable directory")
    remove_stale_temporaries(path.parent)  # of builds whose process was killed
    tmp = temporary_sibling(path)
    command = [cxx, *COMMON_FLAGS, *VARIANT_FLAGS[which], str(source), "-o", str(tmp)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if done.returncode != 0:
            output = done.stderr.lower()
            if any(word in output for word in _NO_SPACE):
                raise _no_space(path.parent, which)
            first = next((line for line in done.stderr.splitlines() if "error" in line), done.stderr.strip()[:200])
            if done.returncode < 0:
                first = f"the compiler was killed by signal {-done.returncode}"
            message = f"building the native kernel ({which}) with {cxx} failed: {first.strip()}"
            if done.returncode > 0 and not any(word in output for word in ENVIRONMENT_FAILURES):
                _remember(failed, message)  # the compiler's verdict on this source and these flags
            raise NativeUnavailable(message)
        # the checksum first, then the library: whoever finds the library finds its checksum (builds of one key
        # are the same bytes, so concurrent builders write the same checksum)
        write_atomically(checksum_path(path), _digest(tmp) + "\n")
        os.replace(tmp, path)
    except NativeUnavailable:
        raise
    except subprocess.TimeoutExpired:
        raise NativeUnavailable(f"building the native kernel with {cxx} took over {BUILD_TIMEOUT_S} s")
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _no_space(path.parent, which)
        raise NativeUnavailable(f"building the native kernel with {cxx} failed: {err}")
    except FastLLCError as err:  # the checksum could not be written (storage's one line)
        if "no space left" in str(err) or "quota" in str(err):
            raise _no_space(path.parent, which)
        raise NativeUnavailable(f"building the native kernel with {cxx} failed: {err}")
    finally:
        remove(tmp)
    return path


def _remember(failed: Path, message: str) -> None:
    """Keep a failed build's one-line reason; a cache that cannot be written just retries next time."""
    try:
        write_atomically(failed, message + "\n")
    except FastLLCError:
        pass


_I64, _F32, _F64, _I32, _U8 = (ctypes.POINTER(t) for t in (ctypes.c_int64, ctypes.c_float, ctypes.c_double,
                                                            ctypes.c_int32, ctypes.c_uint8))
_i64, _d = ctypes.c_int64, ctypes.c_double

# fastllc_mlp_sgld_run's parameters in order, named as in mlp_sgld_cpu.cpp (a test holds the two together):
# ``_declare`` and ``call`` both read this table, so the declaration and every call agree by construction.
RUN_PARAMETERS = (
    ("C", _i64), ("p", _i64), ("e", _i64), ("h", _i64), ("m", _i64),
    ("w", _F32), ("w_star", _F32), ("direction", _F32), ("moves", _U8), ("moves_stride", _i64), ("loss_offset", _d),
    ("coefficients", _F64), ("ops", _I64), ("targets", _I64), ("example_offset", _I64), ("n", _i64),
    ("chain_ids", _I64), ("seed", _i64), ("injected_indices", _I64), ("injected_noise", _F32), ("total_steps", _i64),
    ("edges", _F64), ("edges32", _F32), ("ratios", _F32), ("density", _F64), ("tail", _d),
    ("t0", _i64), ("n_steps", _i64), ("trace", _F64), ("alive", _I32), ("threads", ctypes.c_int),
)


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    i64, d = _i64, _d
    lib.fastllc_mlp_sgld_variant.restype = ctypes.c_char_p
    lib.fastllc_mlp_sgld_variant.argtypes = []
    lib.fastllc_fp_mode.restype = ctypes.c_uint
    lib.fastllc_fp_mode.argtypes = []
    lib.fastllc_fp_modes.restype = None
    lib.fastllc_fp_modes.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_uint)]
    lib.fastllc_mlp_sgld_run.restype = ctypes.c_int
    lib.fastllc_mlp_sgld_run.argtypes = [ctype for _, ctype in RUN_PARAMETERS]
    lib.fastllc_exp.restype = lib.fastllc_gelu.restype = None
    lib.fastllc_exp.argtypes = [i64, _F32, _F32]
    lib.fastllc_gelu.argtypes = [i64, _F32, _F32, _F32]
    lib.fastllc_draw.restype = None
    lib.fastllc_draw.argtypes = [i64, i64, i64, i64, _I64, i64, i64, _F64, _F32, _F32, _F64, d, _I64, _F32]
    lib.fastllc_draw_noise.restype = None
    P = ctypes.c_void_p  # addresses (``ndarray.ctypes.data``): the noise fill's caller passes fixed tables each step
    lib.fastllc_draw_noise.argtypes = [i64, P, i64, i64, P, P, P, P, d, P, i64, P]
    return lib


def call(lib: ctypes.CDLL, **arguments) -> int:
    """``fastllc_mlp_sgld_run`` with its parameters by name (``RUN_PARAMETERS``): NumPy arrays are passed by
    pointer (contiguous, of the declared type), None as a null pointer; returns the kernel's status."""
    if set(arguments) != {name for name, _ in RUN_PARAMETERS}:
        missing = {name for name, _ in RUN_PARAMETERS} ^ set(arguments)
        raise TypeError(f"fastllc_mlp_sgld_run: wrong parameters {sorted(missing)}")
    values = []
    for name, ctype in RUN_PARAMETERS:
        value = arguments[name]
        if value is None:
            value = ctype()  # a null pointer
        elif isinstance(value, np.ndarray):
            if not value.flags.c_contiguous or np.ctypeslib.as_ctypes_type(value.dtype) is not ctype._type_:
                raise TypeError(f"fastllc_mlp_sgld_run: {name} must be a contiguous {ctype._type_.__name__} array")
            value = value.ctypes.data_as(ctype)
        values.append(value)
    return lib.fastllc_mlp_sgld_run(*values)


_loaded: dict[tuple[str, str], ctypes.CDLL] = {}
VARIANT_ENV = "FASTLLC_NATIVE_VARIANT"


def load(which: str | None = None) -> ctypes.CDLL:
    """The kernel library of variant ``which``, built on first use, loaded once per process and compiler.
    Default: $FASTLLC_NATIVE_VARIANT, else the fastest vector build this CPU runs (``default_variant``).
    NativeUnavailable (one line) when it cannot be built or loaded, or when this CPU does not run it."""
    if which is None:
        which = os.environ.get(VARIANT_ENV) or None
        if which is None:
            return _load_default()
        if which not in VARIANT_FLAGS:
            raise NativeUnavailable(f"{VARIANT_ENV}={which} is not a build of the native kernel; "
                                    f"use one of {', '.join(variants())}")
    if which not in VARIANT_FLAGS:
        raise ValueError(f"unknown variant {which!r}; known: {sorted(VARIANT_FLAGS)}")
    if which not in variants():
        raise NativeUnavailable(f"this CPU does not run the {which} build of the native kernel "
                                f"(it runs {', '.join(variants())})")
    cxx = compiler()
    if (which, cxx) not in _loaded:
        path = build(which)
        try:
            _loaded[which, cxx] = _declare(ctypes.CDLL(str(path)))
        except OSError as err:
            raise NativeUnavailable(f"cannot load the native kernel {path}: {err}")
    return _loaded[which, cxx]


def choice_path(cxx: str) -> Path:
    """Where the timed choice among this CPU's vector builds is kept (key: source, compiler, CPU, candidates)."""
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), _compiler_identity(cxx).encode(), cpu_name().encode(),
                                     " ".join(variants()).encode()])).hexdigest()[:20]
    return fastllc_home() / "native" / f"choice-{key}.json"


def _load_default() -> ctypes.CDLL:
    """The fastest vector build this CPU runs: each one built, and timed when there are several (once: the
    choice is kept in ``choice_path``); the portable build only when no vector build builds."""
    cxx = compiler()
    if ("default", cxx) not in _loaded:  # once per process, as every library
        _loaded["default", cxx] = _choose_default(cxx)
    return _loaded["default", cxx]


def _choose_default(cxx: str) -> ctypes.CDLL:
    chosen = choice_path(cxx)
    candidates = [v for v in variants() if v != "scalar"]
    try:
        recorded = json.loads(chosen.read_text())["variant"]
    except (OSError, ValueError, KeyError, TypeError):
        recorded = None
    if recorded in candidates:
        try:
            return load(recorded)
        except NativeUnavailable:
            pass  # its build went away and fails now: choose again
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max(1, len(candidates))) as pool:  # the compilers side by side (first use: half the wait)
        built = dict(zip(candidates, pool.map(_build_or_error, candidates)))
    libraries, errors = {}, []
    for candidate in candidates:
        try:
            if isinstance(built[candidate], NativeUnavailable):
                raise built[candidate]
            libraries[candidate] = load(candidate)
        except NativeUnavailable as err:  # e.g. a compiler without AVX-512 support still builds avx2
            errors.append(err)
    if not libraries:
        try:
            return load("scalar")
        except NativeUnavailable as err:
            raise (errors or [err])[0]
    if len(libraries) == 1:
        return next(iter(libraries.values()))
    timings = time_variants(list(libraries))
    best = min(timings, key=timings.get)
    record = {"variant": best, "us_per_chain_step": {v: round(t, 2) for v, t in timings.items()},
              "cpu": cpu_name(), "workload": "p53-e8-h32-m64, one thread",
              "note": f"the default build, chosen by timing; delete this file to time again, or set {VARIANT_ENV}"}
    try:
        write_atomically(chosen, json.dumps(record, indent=1) + "\n")
    except FastLLCError:
        pass  # an unwritable cache: time again next process
    return libraries[best]


def _build_or_error(which: str) -> Path | NativeUnavailable:
    try:
        return build(which)
    except NativeUnavailable as err:
        return err


def default_variant() -> str:
    """The variant ``load()`` uses here (built and timed on first use)."""
    return load().fastllc_mlp_sgld_variant().decode()


def time_variants(candidates: list[str], rounds: int = 7) -> dict[str, float]:
    """Microseconds per chain-step of each built variant: 8 chains × 25 steps of the published shape (p = 53,
    e = 8, h = 32, m = 64) on one thread, the rounds interleaved, the least thread CPU time of each (what other
    processes on the machine take is not counted). About 50 ms in all."""
    import numpy as np

    from . import ziggurat
    p, e, h, m, n, chains, steps = 53, 8, 32, 64, 2247, 8, 25
    d = p * e + 2 * (h * e + h) + p * h
    rng = np.random.default_rng(0)
    w_star = (rng.standard_normal((chains, d)) * 0.3).astype(np.float32)
    coefficients = np.tile(np.array([1e-3 * 5.0 / 2, 1e-3 * 300.0 / 2, 1e-3 ** 0.5]), (chains, 1))  # SGLD's
    operands = rng.integers(0, p, (n, 2)).astype(np.int64)
    targets = operands.sum(1) % p
    best = {v: float("inf") for v in candidates}
    for _ in range(rounds):
        for candidate in candidates:
            w = w_star.copy()
            start = time.thread_time()
            call(load(candidate), C=chains, p=p, e=e, h=h, m=m, w=w, w_star=w_star, direction=None, moves=None,
                 moves_stride=0, loss_offset=0.0, coefficients=coefficients, ops=operands, targets=targets,
                 example_offset=np.zeros(chains, np.int64), n=n, chain_ids=np.arange(chains, dtype=np.int64),
                 seed=0, injected_indices=None, injected_noise=None, total_steps=steps, **ziggurat.ziggurat_tables(),
                 t0=0, n_steps=steps, trace=np.empty((chains, steps)), alive=np.ones(chains, np.int32), threads=1)
            best[candidate] = min(best[candidate], time.thread_time() - start)
    return {v: seconds / (chains * steps) * 1e6 for v, seconds in best.items()}
