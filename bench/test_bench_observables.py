"""Observables: what the probes cost on top of the chains, and the issue's language-model workload.

1. The ``generic`` backend on a 4-layer MLP (bench/test_bench_groups.py's, 16 chains × 500 steps, traced), rounds
   alternating: ``observe=None`` (the loop as it was: the hook is one ``is not None`` test per step), a recorder
   evaluating 256 probe examples every 10th step, and every step. Chain-steps per second of the sampler's loop.
2. A tiny GPT-2 (2 layers, 4 heads, width 32; tests/lm_models.py) on the observables workload: three observables
   of 16 sequences, 4 chains × 50 draws, three restrictions (full, l0 attn, l1 attn), devinterp 2.0.1's settings
   (``fastllc.compat.devinterp2.observe``): one batched run, then the susceptibilities and the BIF from it.
   devinterp 2.0.1 itself cannot share this environment; tests/compat2/test_observables_devinterp2.py times it
   beside fastllc in build/venv-devinterp2.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fastllc.observables as obs
from fastllc import SGLDConfig
from fastllc.backends import generic
from fastllc.observables.recording import Draws

from conftest import DeepMLP, record

pytestmark = pytest.mark.benchmark(min_rounds=1)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


MLP = DeepMLP()


def _model_and_data():
    torch.manual_seed(0)
    model = MLP.module()
    x = torch.randn(4096, MLP.inputs)
    return model, (x, (x[:, :MLP.classes]).argmax(dim=1))


def test_probes_cost_only_when_asked(benchmark):
    model, (x, y) = _model_and_data()
    chains, steps = 16, 500
    config = SGLDConfig(chains=chains, steps=steps, epsilon=1e-4, gamma=100.0, batch_size=MLP.batch_size, seed=0)
    probes = obs.make_probes({"probe": (x[:256], y[:256])}, obs.per_example_cross_entropy)
    seconds = {"none": [], "every 10": [], "every step": []}

    def recorder(thin):
        return obs.Recorder(probes, Draws(steps, thin=thin), {"all": (0, chains)})

    def run():
        for name, make in (("none", lambda: None), ("every 10", lambda: recorder(10)),
                           ("every step", lambda: recorder(1))):
            samples = generic.sample(model, x, y, F.cross_entropy, config, observe=make(), init_loss=1.0, trace=True)
            seconds[name].append(samples.seconds)

    benchmark.pedantic(run, rounds=2, iterations=1)
    for name, values in seconds.items():
        record(benchmark, f"generic observe {name}", MLP, chains, steps, values)
    base = statistics.median(seconds["none"])
    print(f"\nprobes (256 examples) every 10th step: {statistics.median(seconds['every 10']) / base:.2f}× the loop "
          f"without; every step: {statistics.median(seconds['every step']) / base:.2f}×")


def test_issue_workload_on_a_tiny_gpt2(benchmark):
    pytest.importorskip("transformers")
    from lm_models import VOCAB, gpt2
    from fastllc.compat.devinterp2 import observables as devinterp2
    torch.manual_seed(0)
    model = gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, VOCAB, (128, 16), generator=g)
    observables = {name: {"input_ids": torch.randint(0, VOCAB, (64, 16), generator=g)} for name in ("a", "b", "c")}
    settings = dict(lr=3e-4, n_beta=30.0, num_chains=4, num_draws=50, batch_size=16, batches_per_draw=1,
                    localization=100.0, num_init_loss_batches=4)
    seconds = []

    def run():
        started = time.perf_counter()
        result = devinterp2.observe(model, {"input_ids": data}, observables,
                                    {"full": None, "l0 attn": "l0 attn", "l1 attn": "l1 attn"}, **settings)
        obs.compute_susceptibilities(result, "a", estimator="devinterp")
        obs.compute_bif(result)
        seconds.append(time.perf_counter() - started)

    benchmark.pedantic(run, rounds=2, iterations=1)
    benchmark.extra_info.update(workload="gpt2-2x4x32 3 obs × 16 seq, 3 restrictions × 4 chains × 50 draws",
                                seconds=[round(s, 2) for s in seconds])
    print(f"\nobservables workload, one batched run + susceptibilities + BIF: {min(seconds):.1f} s (best of 2)")
