"""Backend ``transformer`` (GPT-2 with the chains folded into the batch) beside ``generic`` (torch.func.vmap), in
the same run, on the language-model workload of bench/test_bench_lm.py: a tiny GPT-2 (2 layers, 4 heads, width
64, vocabulary 64, context 32), briefly trained, SGLD with 200 steps, minibatches of 16 sequences, ε 5e-5,
γ 1000, nβ 1000, over 8,192 sequences, at 4 and 16 chains; both through ``fastllc.lm.estimate`` (``backend=``).

Before timing, the two backends follow the reference parameter by parameter under the same injected draws
(conformance's τ). The backends alternate, ``ROUNDS`` rounds each, and the median rate of each is reported
(a shared machine's load changes over minutes); rates are chain-steps per second of the sampler's own loop,
and the fraction of the sgemm ceiling that conftest measures in the same run (the workload's matmul FLOPs,
``TinyGPT2.flops_per_chain_step``). Beside them, chain-steps per second of CPU time against the one-thread
sgemm per CPU-second (``test_cpu_time_per_chain_step``): what the code costs, which the load moves far less. The
closing table gives the CPU, the load average at the start and the end, each rate, its ratio to generic's and
its share of the ceiling.

    python -m pytest bench/test_bench_transformer.py --benchmark-only -s
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

import fastllc.lm as lm
from fastllc import SGLDConfig, conformance
from fastllc.backends import generic, reference, transformer
from fastllc.sampling import InjectedRandomness
from fastllc.sampling.contract import flat_parameters

from conftest import best_ceiling, cpu_description, record
from test_bench_lm import SGLD, WORKLOAD, trained  # noqa: F401  (the trained tiny GPT-2 and its sequences)

pytestmark = pytest.mark.benchmark(min_rounds=1)

ROUNDS = 2
BACKENDS = ("generic", "transformer")
ROWS: dict[tuple[str, int], list[float]] = {}
CPU_ROWS: dict[tuple[str, int], float] = {}
LOAD = {"start": os.getloadavg()[0]}


def test_both_backends_follow_the_reference_before_timing(benchmark, trained):
    """3 chains × 8 steps of the trained workload from its own sequences, the same injected draws on all three."""
    model, tokens = trained
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # --benchmark-only runs only benchmarks
    wrapped, data = lm.CausalLM(model), lm.token_data(tokens[:256])
    chains, steps = 3, conformance.STEPS
    noise = InjectedRandomness.seeded(chains, steps, len(data), SGLD["batch_size"], flat_parameters(wrapped)[2].numel())
    config = SGLDConfig(chains=chains, steps=steps, batch_size=SGLD["batch_size"], epsilon=1e-3, gamma=5.0, nbeta=20.0,
                        orthogonal=True)
    with lm.sampling_mode(model):
        runs = {b.NAME: b.sample(wrapped, *data.pair, lm.next_token_loss, config, randomness=noise)
                for b in (reference, generic, transformer)}
    for name in BACKENDS:
        conformance.assert_follows(runs[name], runs["reference"], steps)


@pytest.mark.parametrize("chains", [4, 16])
def test_transformer_beside_generic(benchmark, trained, chains):
    """generic, transformer, generic, transformer, ... (ROUNDS each) through fastllc.lm.estimate; median rates."""
    model, tokens = trained
    rates = {name: [] for name in BACKENDS}
    llcs = {}

    def rounds():
        for _ in range(ROUNDS):
            for name in BACKENDS:
                result = lm.estimate(model, tokens, chains=chains, backend=name, **SGLD)
                assert result.backend == name and all(result.healthy)
                rates[name].append(result.chain_steps_per_second)
                llcs[name] = result.llc_mean

    benchmark.pedantic(rounds, rounds=1, iterations=1)
    for name in BACKENDS:
        ROWS[name, chains] = rates[name]
        benchmark.extra_info[f"{name} rates"] = [round(r, 1) for r in rates[name]]
        benchmark.extra_info[f"{name} llc"] = round(llcs[name], 2)
        record(benchmark, name, WORKLOAD, chains, SGLD["steps"], [chains * SGLD["steps"] / r for r in rates[name]])
    # the same chains, rounded differently: λ̂ of the same size (the draws are the same counter-based streams)
    assert abs(llcs["transformer"] - llcs["generic"]) < 0.2 * abs(llcs["generic"]) + 1.0


@pytest.mark.parametrize("chains", [4, 16])
def test_cpu_time_per_chain_step(benchmark, trained, chains):
    """Chain-steps per second of this process's CPU time (every group's thread counted; time other processes take
    is not): a figure the load moves far less than the wall-clock rate. Each backend's ``sample`` directly, L_n(w*)
    given (no pass over the data), 100 steps, alternating twice; the better of each."""
    model, tokens = trained
    wrapped, data = lm.CausalLM(model), lm.token_data(tokens)
    config = SGLDConfig(chains=chains, **{**SGLD, "steps": 100})
    best = {}

    def rounds():
        with lm.sampling_mode(model):
            for _ in range(2):
                for backend in (generic, transformer):
                    start = time.process_time()
                    backend.sample(wrapped, *data.pair, lm.next_token_loss, config, init_loss=3.0)
                    rate = chains * config.steps / (time.process_time() - start)
                    best[backend.NAME] = max(best.get(backend.NAME, 0.0), rate)

    benchmark.pedantic(rounds, rounds=1, iterations=1)
    for name, rate in best.items():
        CPU_ROWS[name, chains] = rate
        benchmark.extra_info[f"{name} chain-steps per CPU-second"] = round(rate, 1)


def test_summary(benchmark):
    """The table of this run: rates, ratio to generic at equal chains, share of the ceiling, CPU and load."""
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    ceiling = best_ceiling()  # the best of the run's first and last sgemm measurements, as conftest's table
    lines = [f"\ntiny GPT-2 ({WORKLOAD.family()}), {SGLD['steps']} steps, on {cpu_description()}",
             f"sgemm ceiling {ceiling['ceiling'] / 1e9:.0f} GFLOP/s ({ceiling['threads']} threads); load average "
             f"{LOAD['start']:.1f} at the start, {os.getloadavg()[0]:.1f} at the end",
             f"{'backend':12} {'chains':>6} {'chain-steps/s':>14} {'/ generic':>10} {'% ceiling':>10}  rounds"]
    for (name, chains), rates in sorted(ROWS.items(), key=lambda item: (item[0][1], item[0][0])):
        rate, base = statistics.median(rates), statistics.median(ROWS[("generic", chains)])
        share = rate * WORKLOAD.flops_per_chain_step() / ceiling["ceiling"]
        lines.append(f"{name:12} {chains:6d} {rate:14.1f} {rate / base:9.2f}x {share:10.1%}  "
                     + ", ".join(f"{r:.0f}" for r in rates))
    if CPU_ROWS:
        per_core = ceiling["one_thread_large_cpu"]
        lines.append(f"per second of CPU time (one-thread sgemm: {per_core / 1e9:.0f} GFLOP per CPU-second)")
        for (name, chains), rate in sorted(CPU_ROWS.items(), key=lambda item: (item[0][1], item[0][0])):
            share = rate * WORKLOAD.flops_per_chain_step() / per_core
            lines.append(f"{name:12} {chains:6d} {rate:14.1f} {rate / CPU_ROWS[('generic', chains)]:9.2f}x "
                         f"{share:10.1%}  (chain-steps per CPU-second)")
    print("\n".join(lines))
