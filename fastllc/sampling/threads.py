"""How sampling uses the CPU: chains split into groups, one group per core, single-threaded torch ops.

Why. One SGLD step is a few dozen tensor operations of kilobytes each. torch's intra-op threads (OpenMP)
split every operation across cores and wait for each other at its end; when another process uses the
cores, a descheduled thread stalls every such barrier. Measured on a 2-core machine next to another
PyTorch process: ``fastllc estimate --chains 4`` (5,000 steps) took 318 s with torch's default threads
and 3.5 s with one thread (same estimate). So no backend samples with intra-op threads, at any chain
count: chains are split into contiguous groups, each group is run by its own Python thread with
single-threaded torch ops (torch ops and the Numba noise fills release the GIL), and groups never wait
for each other until they are all done, so a descheduled group delays only itself.

A group is worth its thread only with enough chains in it: each group pays its own per-step Python
overhead, which holds the GIL. With fewer than ``min_per_group`` chains per core all chains run as one
group, still single-threaded (measured on the published MLP, see ``chain_groups``).

Grouping never changes results: randomness is counter-based per chain (``randomness.py``) and every
operation is per chain, so a chain's trajectory is the same bits in any group of any size.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

import torch

T = TypeVar("T")

# Chains per group below which a second group costs more than it saves. Published MLP (p=53, e=8, h=32,
# m=64), 2 cores, 300 steps, one group vs two (single-threaded): 16 chains, two groups 1.0–2.2× slower;
# 64 chains, two groups 1.7× faster (quiet) and 1.7× faster next to a competing process.
MIN_CHAINS_PER_GROUP = 16


def available_cores() -> int:
    """Cores this process may run on.

    The affinity mask (``taskset``, cgroup cpusets) where the OS reports it, else ``os.cpu_count()``.
    Not ``torch.get_num_threads()``: that is a setting, and sampling itself changes it (it is 1 inside
    ``single_threaded_torch``, in ``train_together``, or under OMP_NUM_THREADS=1 in a pinned test session),
    so the number of groups would depend on who called; the cores are what the groups' threads run on.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS and Windows have no affinity call
        return max(1, os.cpu_count() or 1)


@contextmanager
def single_threaded_torch() -> Iterator[None]:
    """torch ops single-threaded inside the block; the previous ``torch.get_num_threads()`` restored on
    leaving it, also on an exception. The setting is process-wide: threads started inside the block (the
    chain groups) share it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def chain_groups(chains: int, device: torch.device | str = "cpu", *, min_per_group: int = MIN_CHAINS_PER_GROUP,
                 groups: int | None = None) -> list[tuple[int, int]]:
    """Contiguous groups of chains as (lo, hi) bounds covering 0..chains, sizes differing by at most one.

    On the CPU, one group per available core, but no more than ``chains // min_per_group`` (at least one).
    On another device one group: the device does the arithmetic, one host thread feeds it. ``groups``,
    when given, sets the number instead (capped at ``chains``).
    """
    if chains < 1:
        raise ValueError(f"chains must be at least 1, got {chains}")
    if groups is None:
        on_cpu = torch.device(device).type == "cpu"
        groups = min(available_cores(), chains // max(1, min_per_group)) if on_cpu else 1
    groups = max(1, min(groups, chains))
    return [(chains * g // groups, chains * (g + 1) // groups) for g in range(groups)]


def run_groups(fn: Callable[[int, int], T], groups: list[tuple[int, int]]) -> list[T]:
    """``[fn(lo, hi) for (lo, hi) in groups]`` with single-threaded torch ops; each group in its own thread
    when there are several. Results in the order of ``groups``; the first group's exception is raised
    after all groups have stopped."""
    with single_threaded_torch():
        if len(groups) == 1:
            return [fn(*groups[0])]
        with ThreadPoolExecutor(len(groups)) as pool:
            futures = [pool.submit(fn, lo, hi) for lo, hi in groups]
            return [future.result() for future in futures]
