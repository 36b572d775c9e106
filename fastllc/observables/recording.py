"""Observables recorded during sampling: every probe example's element losses at each draw, for all chains.

``Recorder`` is the ``observe=`` object of the ``generic`` backend (capability ``observe``). The backend asks
``due(t)`` at every step and, at a draw, calls ``recorder(t, ids, model, names, weights)`` from each of its chain
groups with that group's chain indices, its own module copy and the chains' weights at w_t as parameter-major
views ([c, *shape] per parameter). The recorder evaluates every probe set for those chains at once,
``vmap(functional_call)`` over the chains with the probes shared, ``probe_batch`` examples at a time, without
autograd, and adds the losses to running sums (``moments.py``: means and covariances per chain, memory stated
there) and, when asked, streams them to disk (``draws.py``: raw [chains, draws, N, K] float32 in a ``.npz``).

Draws are by default the records λ̂ reads: w_t for t = burn_in + thin − 1 + k·thin, k = 0 .. (steps − burn_in)//thin − 1
(``Draws``; the SGLD loss L_m(w_t) of the same step is what λ̂ averages).

Probes (``Probes``): O named sets of examples (inputs, targets), concatenated to N examples, each giving K element
losses through ``element_loss(outputs, targets) -> [B, K]`` (or [B]: K = 1); ``weights`` [N, K] says which
elements count (a language model's masked tokens: 0). An example's loss is the weighted mean of its elements, a
set's loss the weighted mean of all its elements.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.func import functional_call, vmap

from ..errors import FastLLCError
from ..resources import available_memory_bytes, format_bytes
from ..validate import check_int
from .moments import Moments, moments_bytes


@dataclass(frozen=True)
class Draws:
    """Which steps are draws: w_t for t = first + k·thin, k = 0 .. count − 1, t < steps. By default
    first = burn_in + thin − 1: λ̂'s records (``first=burn_in + 1`` gives devinterp 2's: after each step)."""

    steps: int
    burn_in: int = 0
    thin: int = 1
    first: int | None = None

    @property
    def start(self) -> int:
        return self.burn_in + self.thin - 1 if self.first is None else self.first

    @property
    def count(self) -> int:
        return max(0, (self.steps - 1 - self.start) // self.thin + 1)

    def index(self, t: int) -> int:
        """The draw step ``t`` is, or −1."""
        k = t - self.start
        return k // self.thin if k >= 0 and k % self.thin == 0 and k // self.thin < self.count else -1


@dataclass(frozen=True)
class Probes:
    """O named probe sets as one block of N examples (module docstring)."""

    names: tuple
    inputs: torch.Tensor  # [N, ...]
    targets: torch.Tensor  # [N, ...]
    weights: torch.Tensor  # [N, K] float64: which elements count
    offsets: tuple  # O + 1 bounds: set o is examples offsets[o] .. offsets[o+1] − 1
    element_loss: object  # (outputs, targets) -> [B, K] or [B]

    @property
    def examples(self) -> int:
        return len(self.inputs)

    @property
    def elements(self) -> int:
        return self.weights.shape[1]

    def rows(self, name: str) -> slice:
        if name not in self.names:
            raise FastLLCError(f"no probe set {name!r}; the probe sets are {', '.join(map(repr, self.names))}")
        o = self.names.index(name)
        return slice(self.offsets[o], self.offsets[o + 1])

    def set_weights(self) -> torch.Tensor:
        """[O, N, K]: set o's element weights normalised to sum 1 (its mean loss is ⟨that, x⟩)."""
        out = torch.zeros(len(self.names), *self.weights.shape, dtype=torch.float64)
        for o, name in enumerate(self.names):
            rows = self.rows(name)
            out[o, rows] = self.weights[rows] / self.weights[rows].sum()
        return out

    def example_weights(self) -> torch.Tensor:
        """[N, K]: each example's element weights normalised to sum 1 (its loss is the weighted mean)."""
        return self.weights / self.weights.sum(dim=1, keepdim=True)


def make_probes(sets: dict, element_loss, weights: dict | None = None, elements: int = 1) -> Probes:
    """``sets`` {name: (inputs, targets)} as ``Probes``; ``weights`` {name: [N_o, K]} (default: every element of
    ``elements`` per example counts). Checked: names, equal K, non-empty sets, every example with a weight."""
    if not isinstance(sets, dict) or not sets:
        raise FastLLCError("probes must be a non-empty dict {name: (inputs, targets)}")
    inputs, targets, masks, offsets = [], [], [], [0]
    for name, pair in sets.items():
        if not isinstance(name, str) or not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise FastLLCError(f"probes[{name!r}] must be an (inputs, targets) pair named by a string")
        x, y = (torch.as_tensor(v) for v in pair)
        if len(x) == 0 or len(x) != len(y):
            raise FastLLCError(f"probes[{name!r}] has {len(x)} inputs and {len(y)} targets; need equal and non-zero")
        w = torch.ones(len(x), elements) if weights is None else torch.as_tensor(weights[name])
        if w.dim() != 2 or len(w) != len(x) or bool((w.sum(dim=1) <= 0).any()):
            raise FastLLCError(f"probes[{name!r}]: weights must be [examples, elements] with a positive sum per "
                               "example (every example needs an element that counts)")
        inputs.append(x), targets.append(y), masks.append(w.double()), offsets.append(offsets[-1] + len(x))
    if len({m.shape[1] for m in masks}) > 1:
        raise FastLLCError("every probe set must give the same number of losses per example (e.g. sequences of "
                           "one length)")
    return Probes(tuple(sets), torch.cat(inputs), torch.cat(targets), torch.cat(masks), tuple(offsets), element_loss)


def sums_budget(max_memory: int | None) -> tuple:
    """(bytes the running sums may take or None (unknown), what that is): ``max_memory``, else a quarter of the
    memory available now."""
    if max_memory is not None:
        return check_int("max_memory", max_memory, minimum=1), "max_memory"
    available = available_memory_bytes()
    return (None, "") if available is None else (available // 4, "a quarter of the available memory")


class Recorder:
    """The ``observe=`` object (module docstring): probe losses at the draws, into running sums and/or a file.

    ``groups``: {name: (lo, hi)} the chain range of each restriction group. ``token_moments``: keep Σ x xᵀ per
    chain (token influences); ``chain_mean``: keep every chain's losses at every draw, float32 (4·C·D·N·K bytes:
    influences with chains averaged, and their standard errors); ``raw``: a ``.npz`` path to stream the raw draws to
    (``draws.RawWriter``); ``max_memory``: bytes the sums may take (default: a quarter of the available memory;
    refused above it, before sampling)."""

    def __init__(self, probes: Probes, draws: Draws, groups: dict, *, token_moments: bool = False,
                 chain_mean: bool = False, raw=None, probe_batch: int = 32, max_memory: int | None = None):
        self.probes, self.draws, self.groups = probes, draws, dict(groups)
        self.chains = max(hi for _, hi in self.groups.values())
        self.token_moments, self.chain_mean, self.raw_path = token_moments, chain_mean, raw
        self.probe_batch = check_int("probe_batch", probe_batch, minimum=1)
        self.bytes = moments_bytes(self.chains, probes.examples, probes.elements, len(probes.names),
                                   token_moments=token_moments, draws=draws.count if chain_mean else 0)
        self._check_memory(max_memory)
        if raw is not None:
            from .draws import check_raw_path
            check_raw_path(raw)  # before any sampling
        self.moments, self.writer, self.seconds, self._lock = None, None, 0.0, threading.Lock()
        self._device = None

    def _check_memory(self, max_memory: int | None) -> None:
        """Refuse sums above ``sums_budget(max_memory)``, before sampling."""
        budget, source = sums_budget(max_memory)
        if budget is not None and self.bytes > budget:
            raise FastLLCError(f"the running sums need {format_bytes(self.bytes)}, more than {format_bytes(budget)} "
                               f"({source}); drop token_moments/chain_mean, use fewer probe examples, or stream "
                               "the raw draws to disk (raw='draws.npz') and compute influences from them")

    def begin(self, chains: int, steps: int, device) -> None:
        """Called by the backend before its first step (once per call; several calls: see ``at``)."""
        if steps != self.draws.steps or chains > self.chains:
            raise FastLLCError(f"the recorder was made for {self.chains} chains × {self.draws.steps} steps, the run "
                               f"has {chains} × {steps}")
        with self._lock:
            if self.moments is None:
                self._start(torch.device(device))

    def _start(self, device) -> None:
        p = self.probes
        self._device = device
        self._inputs, self._targets = p.inputs.to(device), p.targets.to(device)
        self._example = p.example_weights().to(device)
        self._sets = p.set_weights().to(device)
        self.moments = Moments.zeros(self.chains, p.examples, p.elements, len(p.names), self.draws.count,
                                     token_moments=self.token_moments, chain_mean=self.chain_mean, device=device)
        if self.raw_path is not None:
            from .draws import RawWriter
            self.writer = RawWriter(self.raw_path, self.chains, self.draws.count, p.examples, p.elements)

    def due(self, t: int) -> bool:
        return self.draws.index(t) >= 0

    def __call__(self, t: int, ids, model, names, weights, offset: int = 0) -> None:
        """At draw ``t``: evaluate every probe for the chains ``ids`` (+ ``offset``) and add their losses."""
        started = time.perf_counter()
        ids = np.asarray(ids) + offset
        lo, hi = int(ids[0]), int(ids[-1]) + 1
        if hi - lo != len(ids):
            raise FastLLCError("the recorder takes contiguous chain ranges (the generic backend's groups)")
        x = self.evaluate(model, names, weights)  # [c, N, K] float64
        s = (x * self._example).sum(dim=2)
        m = torch.einsum("cnk,onk->co", x, self._sets)
        draw = self.draws.index(t)
        self.moments.add(lo, hi, draw, x, s, m)
        if self.writer is not None:
            self.writer.write(lo, hi, draw, x)
        with self._lock:
            self.seconds += time.perf_counter() - started

    @torch.no_grad()
    def evaluate(self, model, names, weights) -> torch.Tensor:
        """Every probe example's element losses for each chain: [c, N, K] float64 (masked elements 0)."""
        loss_of = self.probes.element_loss

        def one(params, x, y):
            out = loss_of(functional_call(model, dict(zip(names, params)), (x,)), y)
            return out.reshape(x.shape[0], -1)

        batched = vmap(one, in_dims=(0, None, None), randomness="different")  # dropout, if on: a mask per chain
        step, n = self.probe_batch, self.probes.examples
        parts = [batched(tuple(weights), self._inputs[lo:lo + step], self._targets[lo:lo + step])
                 for lo in range(0, n, step)]
        x = torch.cat(parts, dim=1).double()
        if x.shape[1:] != self._example.shape:
            raise FastLLCError(f"element_loss gave {tuple(x.shape[2:])} losses per example, the probes' weights "
                               f"{self._example.shape[1]}")
        return torch.where(self._example > 0, x, torch.zeros((), dtype=x.dtype, device=x.device))

    def at(self, offset: int) -> "_Shifted":
        """This recorder seen by a backend call that runs chains offset .. (its local chain j is chain offset + j)."""
        return _Shifted(self, offset)

    def finish(self):
        """(the sums on the CPU, the raw file's path or None) after the last backend call."""
        if self.moments is None:
            raise FastLLCError("the recorder saw no draws (was it passed to a backend with the 'observe' capability?)")
        path = self.writer.finish(self.probes, self.groups, self.draws) if self.writer is not None else None
        return self.moments.cpu(), path

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


class _Shifted:
    """A ``Recorder`` for a backend call that runs a later part of the chains (memory-planned parts)."""

    def __init__(self, recorder: Recorder, offset: int):
        self.recorder, self.offset = recorder, int(offset)

    def begin(self, chains: int, steps: int, device) -> None:
        if self.offset + chains > self.recorder.chains:
            raise FastLLCError(f"chains {self.offset}..{self.offset + chains - 1} exceed the recorder's "
                               f"{self.recorder.chains}")
        self.recorder.begin(chains, steps, device)

    def due(self, t: int) -> bool:
        return self.recorder.due(t)

    def __call__(self, t, ids, model, names, weights) -> None:
        self.recorder(t, ids, model, names, weights, offset=self.offset)


__all__ = ["Draws", "Probes", "Recorder", "make_probes", "sums_budget"]
