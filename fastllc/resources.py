"""How much memory training and sampling need, and how much there is: refuse work that cannot fit, up front.

The estimates count the large tensors of each stage, in bytes, rounded up (an estimate that is too high
only refuses work at the very edge of the machine; one that is too low lets a run die mid-way):

  task (train.py, tasks.py)       the p² pairs (a, b) with labels, split and train/test copies:   96·p²
  full batch over n examples      embeddings, hidden pre-/activations and p logits per example,
                                  forward only (training metrics at every checkpoint; n ≤ p²):    4·n·(2p + 4h + 2e)
                                  with the backward pass (L_n(w*) and ∇L_n(w*) before sampling):  4·n·(4p + 8h + 4e)
  chains (sampling/*.py)          per chain: d weights in ~12 float32 copies (W, G, w*, a·w*, noise
                                  on host and device, the step's gradients, direction, finals):   48·d
                                  the study's MLP's minibatch of m examples per step:             4·m·(3p + 5h + 4e)
                                  the loss trace of T steps (float32 and float64 copies, masks,
                                  and the estimator's FFT for the effective sample size):         128·T

Measured peaks (resident memory, 2 CPU threads, e = 8, h = 32, backend torch) are 0.55–0.85× the estimate:
training p = 400 and 600; sampling p = 400 (8 chains × 50 steps), p = 5 (20,000 chains × 200 steps and
2,000 chains × 5,000 steps: ~85 bytes per chain-step).
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import FastLLCError


def mlp_parameters(p: int, embed: int, hidden: int) -> int:
    """d of the study's MLP: embedding p·e, two maps h·e with biases, unembedding h·p."""
    return p * embed + 2 * (hidden * embed + hidden) + hidden * p


def task_bytes(p: int) -> int:
    """The full table of p² pairs and labels, its seeded split and the train/test copies."""
    return 96 * p * p


def full_batch_bytes(p: int, embed: int, hidden: int, examples: int, backward: bool) -> int:
    """One pass of the study's MLP over ``examples`` examples at once (with its backward pass or not)."""
    per_example = 4 * (2 * p + 4 * hidden + 2 * embed)
    return examples * per_example * (2 if backward else 1)


def chains_bytes(chains: int, steps: int, parameters: int, minibatch_bytes: int = 0) -> int:
    """Every chain's weight-sized buffers, its minibatch activations and its loss trace."""
    return chains * (48 * parameters + minibatch_bytes + 128 * steps)


def mlp_minibatch_bytes(p: int, embed: int, hidden: int, batch_size: int) -> int:
    """One chain's activations for one SGLD step of the study's MLP on ``batch_size`` examples."""
    return 4 * batch_size * (3 * p + 5 * hidden + 4 * embed)


def training_bytes(p: int, embed: int, hidden: int) -> int:
    """Training the study's MLP on Z_p (minibatch steps are small; the metrics over all pairs are not)."""
    return task_bytes(p) + full_batch_bytes(p, embed, hidden, p * p, backward=False) + 64 * mlp_parameters(p, embed, hidden)


def require_training_memory(p: int, embed: int, hidden: int) -> None:
    """Refuse, before any work, training that cannot fit; the message names what is too large."""
    weights = 64 * mlp_parameters(p, embed, hidden)
    needed = training_bytes(p, embed, hidden)
    if weights > needed / 2:  # wide layers, not the p² pairs, are what does not fit
        require_memory(needed, f"e = {embed}, h = {hidden} at p = {p}", "training (the weights and Adam's state)",
                       "use a smaller --embed or --hidden")
    else:
        require_memory(needed, f"p = {p}", f"training (the p² = {p * p:,} pairs)", "use a smaller --p")


def mlp_start_bytes(p: int, embed: int, hidden: int, examples: int) -> int:
    """What sampling the study's MLP holds before its chains: the task, and the loss and gradient at w* over
    all ``examples`` training pairs at once."""
    return task_bytes(p) + full_batch_bytes(p, embed, hidden, examples, backward=True)


def mlp_sampling_bytes(p: int, embed: int, hidden: int, examples: int, chains: int, steps: int,
                       batch_size: int) -> tuple[int, int]:
    """(bytes for the task and the full-batch loss and gradient at w*, bytes for the chains) of sampling
    the study's MLP: the first grows with p, the second with chains × steps."""
    return mlp_start_bytes(p, embed, hidden, examples), chains_bytes(chains, steps, mlp_parameters(p, embed, hidden),
                               mlp_minibatch_bytes(p, embed, hidden, batch_size))


def sampling_bytes(chains: int, steps: int, parameters: int, minibatch_bytes: int = 0, start_bytes: int = 0,
                   cuda: bool = False) -> tuple[int, int]:
    """(bytes on the sampling device, bytes on the host) of sampling: the start (``start_bytes``: the data and
    the loss and gradient at w* over all of it, where the caller knows them) and every chain's buffers where
    the chains run, their loss traces on the host (``chains_bytes``). On the CPU both are one memory:
    (all of it, 0). On CUDA the device also holds a float32 copy of the traces while it samples."""
    buffers = chains_bytes(chains, 0, parameters, minibatch_bytes)
    traces = chains_bytes(chains, steps, 0)
    if not cuda:
        return start_bytes + buffers + traces, 0
    return start_bytes + buffers + 4 * chains * steps, traces


SAMPLING_PURPOSE = "sampling (every chain's weights, gradients and loss trace)"


def require_sampling_memory(chains: int, steps: int, parameters: int, minibatch_bytes: int = 0, device=None, *,
                            start_bytes: int = 0, subject: str | None = None, start: tuple[str, str, str] | None = None,
                            names: tuple[str, str] = ("batch_size", "chains or steps")) -> None:
    """Refuse, before any work, sampling that cannot fit (``sampling_bytes``: the one formula for the API and
    the commands); on CUDA the device's share and the host's are each checked.

    The message names the work as ``subject`` (default "a run of C chains × T steps of d parameters") and the
    remedy in the caller's words: ``names`` = (the batch size, the chains and steps) as API fields or command
    options (``sampling_advice``). Where the start is most of the need, ``start`` = (subject, purpose, advice)
    says so instead (e.g. "p = 53", "sampling (the loss and gradient at w* over all 2,247 training pairs)",
    "use a smaller --p")."""
    cuda = device is not None and getattr(device, "type", str(device).split(":")[0]) == "cuda"
    on_device, on_host = sampling_bytes(chains, steps, parameters, minibatch_bytes, start_bytes, cuda)
    subject = subject or f"a run of {chains:,} chains × {steps:,} steps of {parameters:,} parameters"
    advice = sampling_advice(chains, steps, parameters, minibatch_bytes, *names)
    purpose = "the chains" if cuda else SAMPLING_PURPOSE
    if start is not None and start_bytes > on_device - start_bytes:
        subject, purpose, advice = start
    require_memory(on_device, subject, purpose, advice, device if cuda else None)
    if cuda:
        require_memory(on_host, subject, "the loss traces", advice)


# What a sweep's driver holds per job until the sweep ends: the Job (~0.7 KB measured), its JSON path and
# its record (final 2-3 KB with circuits, dynamics ~40 KB, calibrate ~1 KB per cell), rounded up.
JOB_BYTES = {"final": 8 * 2**10, "dynamics": 64 * 2**10, "calibrate": 32 * 2**10, "estimate": 8 * 2**10}


def require_jobs_memory(counts: dict[str, int], advice: str) -> None:
    """Refuse, before a sweep's job list is even built, a sweep whose jobs cannot all be held in memory
    (``counts``: jobs of each kind). A count like seeds = 10¹¹ would otherwise grow until the OOM killer
    ends the process without a message."""
    total = sum(counts.values())
    needed = sum(JOB_BYTES.get(kind, JOB_BYTES["dynamics"]) * count for kind, count in counts.items())
    require_memory(needed, f"a sweep of {total:,} jobs", "their job list and records", advice)


def sampling_advice(chains: int, steps: int, parameters: int, minibatch_bytes: int, batch_size: str = "--batch-size",
                    chains_or_steps: str = "--chains or --steps") -> str:
    """What to reduce when sampling does not fit: the term of ``chains_bytes`` that dominates (a huge
    --batch-size is not cured by fewer steps). The names are the caller's: CLI options or API fields."""
    minibatch, rest = chains * minibatch_bytes, chains * (48 * parameters + 128 * steps)
    return f"use a smaller {batch_size}" if minibatch > rest else f"use fewer {chains_or_steps}"


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().split()[0]
        return None if text == "max" else int(text)
    except (OSError, ValueError, IndexError):
        return None


def _stat(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _cgroup_available() -> int | None:
    """What the memory cgroup (v2, else v1) still allows: limit − (usage − reclaimable page cache)."""
    v2, v1 = Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/memory")
    for limit, usage, stat, cache in ((v2 / "memory.max", v2 / "memory.current", v2 / "memory.stat", "inactive_file"),
                                      (v1 / "memory.limit_in_bytes", v1 / "memory.usage_in_bytes",
                                       v1 / "memory.stat", "total_inactive_file")):
        cap, used = _read_int(limit), _read_int(usage)
        if cap is not None and used is not None and cap < 2**60:  # v1 writes "no limit" as ~2^63
            return max(0, cap - max(0, used - _stat(stat, cache)))
    return None


def _host_available() -> int | None:
    """MemAvailable of /proc/meminfo (Linux), else free physical pages (os.sysconf); None when unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def available_memory_bytes(device=None) -> int | None:
    """Bytes that new tensors can still take: on the host (the smaller of MemAvailable and what the memory
    cgroup allows), or on a CUDA ``device`` (free memory plus what PyTorch's allocator holds unused).
    None when it cannot be told."""
    import torch

    if device is not None and torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    known = [b for b in (_host_available(), _cgroup_available()) if b is not None]
    return min(known) if known else None


def format_bytes(count: float) -> str:
    """1.5 GiB, 7.3 TiB, 12 MiB: binary units, one decimal from GiB on."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count / 2**20:.0f} MiB"


def require_memory(needed: int, subject: str, purpose: str, advice: str, device=None) -> None:
    """A FastLLCError when ``needed`` bytes exceed what is available (nothing when that is unknown):
    "<subject> needs about <needed> for <purpose>; <available> is available: <advice>"."""
    available = available_memory_bytes(device)
    if available is not None and needed > available:
        where = "" if device is None or str(device) == "cpu" else f" on {device}"
        raise FastLLCError(f"{subject} needs about {format_bytes(needed)} for {purpose}; "
                           f"{format_bytes(available)} is available{where}: {advice}")
