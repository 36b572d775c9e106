"""How sampling uses the CPU: chains split into groups, one group per core, single-threaded torch ops.

Why. One SGLD step is a few dozen tensor operations of kilobytes each. torch's intra-op threads (OpenMP)
split every operation across cores and wait for each other at its end; when another process uses the
cores, a descheduled thread stalls every such barrier. Measured on a 2-core machine next to another
PyTorch process: ``fastllc estimate --chains 4`` (5,000 steps) took 318 s with torch's default threads
and 3.5 s with one thread (same estimate). So no backend samples with intra-op threads, at any chain
count: chains are split into contiguous groups, each group is run by its own Python thread with
single-threaded torch ops (torch ops and the Numba noise fills release the GIL), and groups never wait
for each other until they are all done, so a descheduled group delays only itself.

A group is worth its own thread only with enough work in it: each group pays its own per-step Python
overhead, which holds the GIL. Below ``MIN_WEIGHTS_PER_GROUP`` weights per group all chains run as one
group, still single-threaded: few chains of a small model never split, a few chains of a large one do.

Grouping does not change what a chain computes: randomness is counter-based per chain (``randomness.py``)
and every operation is per chain. The bits are the same in any grouping (tested at the published shape);
only where a BLAS kernel's choice depends on an operand's memory alignment, which depends on the chain's
place in its group, can they differ by an ulp (seen at awkward shapes such as p=7, e=5, h=13, m=8).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

import torch
from tqdm.auto import tqdm

T = TypeVar("T")

# Weights per group (chains × weights per chain) below which a second group costs more than it saves:
# 16 chains of the published MLP (p=53, e=8, h=32: 2,696 weights). Two single-threaded groups against one,
# 2 cores, medians. torch backend, 300 steps, quiet: 4 chains 1.7× slower, 8 1.35× slower, 16 even,
# 32 1.35× faster, 64 2.3× faster; next to other jobs: 16 chains 1.6× slower, 32 even, 64 1.1–1.3× faster.
# generic backend, 600 steps: 8 chains 1.5× slower, 16 even, 32 1.3×, 64 1.7× faster; a 538k-weight MLP
# with 2 chains: two groups of one chain 1.45× faster.
MIN_WEIGHTS_PER_GROUP = 16 * 2696


def min_chains_per_group(weights_per_chain: int) -> int:
    """The fewest chains of ``weights_per_chain`` weights that make a group worth its own thread."""
    return max(1, -(-MIN_WEIGHTS_PER_GROUP // max(1, weights_per_chain)))


def available_cores() -> int:
    """Cores this process may run on.

    The affinity mask (``taskset``, cgroup cpusets) where the OS reports it, else ``os.cpu_count()``.
    Not ``torch.get_num_threads()``: that is a setting, and sampling itself changes it (it is 1 inside
    ``single_threaded_torch``, in ``train_together``, or under OMP_NUM_THREADS=1 in a pinned test session),
    so the number of groups would depend on who called; the cores are what the groups' threads run on.
    Groups never wait for each other, so sharing a core costs time-sharing, not a stall; to confine
    sampling to fewer cores, narrow the affinity (``taskset -c 0 ...``).
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS and Windows have no affinity call
        return max(1, os.cpu_count() or 1)


@contextmanager
def single_threaded_torch() -> Iterator[None]:
    """torch ops single-threaded inside the block; the previous ``torch.get_num_threads()`` restored on
    leaving it, also on an exception. Usable as a decorator. The setting is process-wide: threads started
    inside the block (the chain groups) take it. Not meant to be entered from several threads at once
    (the last to leave would restore the wrong count)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def chain_groups(chains: int, device: torch.device | str = "cpu", *, min_per_group: int = 1,
                 groups: int | None = None) -> list[tuple[int, int]]:
    """Contiguous groups of chains as (lo, hi) bounds covering 0..chains, sizes differing by at most one.

    On the CPU, one group per available core, but no more than ``chains // min_per_group`` (at least one;
    backends pass ``min_chains_per_group(weights per chain)``).
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


def run_groups_timed(fn: Callable[[int, int, Callable[[int], object]], T], groups: list[tuple[int, int]], *,
                     total: int, desc: str, progress: bool) -> tuple[list[T], float]:
    """``run_groups`` of ``fn(lo, hi, tick)`` with a progress bar of ``total`` chain-steps that every group
    ticks (``tick(chain_steps)``), and the wall time of the groups alone (what a backend reports)."""
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False, unit_scale=True)
    start = time.perf_counter()
    results = run_groups(lambda lo, hi: fn(lo, hi, bar.update), groups)
    seconds = time.perf_counter() - start
    bar.close()
    return results, seconds


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
