"""Which CPU made a result, and training that gives the same bits on any x86-64 CPU.

Training's float32 arithmetic goes through PyTorch's vectorised kernels, chosen at run time by the CPU's
vector extensions (``torch.backends.cpu.get_cpu_capability()``: AVX512, AVX2 or DEFAULT). Their sums run in
a different order per width, so "the same" run trains a slightly different network on another CPU (and SGD
amplifies the last bits: λ̂ of the p = 53 main job moved from 373.1 to 379.1 between a Zen 4 and an AVX-512
Xeon). A run's config.json therefore records the CPU and its extensions (``machine_record``).

``portable_environment`` is what ``TrainConfig(portable=True)`` trains under, in a child process (the
capability is fixed when torch first dispatches, so it cannot change inside a running process): PyTorch's
DEFAULT kernels (no AVX: the baseline x86-64 code every such CPU runs) and MKL's conditional numerical
reproducibility in its COMPATIBLE mode.
"""

from __future__ import annotations

import platform
from pathlib import Path

# the vector extensions that change which kernels PyTorch and MKL run, as /proc/cpuinfo names them
VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_vnni",
                "avx512_bf16", "amx_tile")

PORTABLE_ENVIRONMENT = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"}


def _cpuinfo() -> tuple[str | None, list[str]]:
    """(model name, flags) of the first CPU in /proc/cpuinfo (Linux); (None, []) elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None, []
    model, flags = None, []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model is None:
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = value.split()
    return model, flags


def machine_record() -> dict:
    """The CPU, its vector extensions and the kernels PyTorch chose: what a result's last bits depend on."""
    import torch

    model, flags = _cpuinfo()
    return dict(cpu=model or platform.processor() or platform.machine(),
                vector_extensions=[flag for flag in VECTOR_FLAGS if flag in flags],
                torch_cpu_capability=torch.backends.cpu.get_cpu_capability(), torch=torch.__version__)


def in_portable_environment() -> bool:
    """Whether this process runs PyTorch's DEFAULT (non-vector) kernels, as portable training needs."""
    import torch

    return torch.backends.cpu.get_cpu_capability() == "DEFAULT"
