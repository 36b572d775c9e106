"""Language models: a tiny GPT-2 (2 layers, 4 heads, width 64, vocabulary 64, context 32;
106k parameters; briefly trained on synthetic Markov-chain sequences), SGLD with 200 steps, minibatches of
16 sequences, ε 5e-5, γ 1000, nβ 1000, over 8,192 sequences, at 4 and 16 chains.

Two ways in the same run, both on fastllc's ``generic`` backend:
    ``lm-naive-wrapper`` the peer: the hand-written wrapper a user writes today (a module returning
                         ``.logits[:, :-1]``, a loss flattening tokens), the model as built (SDPA attention:
                         ``torch.func.vmap`` has no batching rule for the CPU SDPA kernel and loops over chains;
                         GPT-2's spelt-out tanh-GELU), ``fastllc.estimate``;
    ``fastllc.lm``       ``fastllc.lm.estimate``: eager attention (batched by vmap), fused tanh-GELU,
                         L_n(w*) in chunks without autograd (and, at 16 chains, with the spelt-out GELU
                         kept: eager attention's share).
Both are checked to record the same loss at w* and λ̂ of the same size before timing. Also: the 8 heads'
λ̂ in one batch (``estimate_groups(groups="per-head")``, 2 chains each) beside one unrestricted run of the
same 16 chains. Rates are chain-steps per second of the sampler's own loop (``sampling_seconds``); the wall
time of the whole call (L_n(w*) and ∇L_n(w*) at the start included) is recorded beside it. Peak RSS: each way
once more at 16 chains (20 steps) in a fresh Python process of its own (``test_peak_rss``, VmHWM: Linux keeps
``ru_maxrss`` across exec, so a child would report its parent's peak); the in-process column is monotone.
The two ways alternate, ``ROUNDS`` rounds each, and the median rate is reported: on a shared machine the load
changes over minutes, and three whole-run benchmarks in sequence gave ratios from 0.7× to 2.4×.

    python -m pytest bench/test_bench_lm.py --benchmark-only -s
"""

from __future__ import annotations

import resource
import statistics
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastllc
import fastllc.lm as lm

from conftest import record
from lm_workload import SGLD, WORKLOAD, train

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.benchmark(min_rounds=1)

ROUNDS = 2
ROWS: dict[str, dict] = {}


@pytest.fixture(scope="module")
def trained():
    return train()


class NaiveWrapper(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).logits[:, :-1]


def flat_cross_entropy(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def run_naive(model, tokens, chains):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vmap's "no batching rule" warning: the point of the comparison
        return fastllc.estimate(NaiveWrapper(model), (tokens, tokens[:, 1:]), flat_cross_entropy, chains=chains,
                                backend="generic", **SGLD)


def run_lm(model, tokens, chains):
    return lm.estimate(model, tokens, chains=chains, **SGLD)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(benchmark, label, run, chains, steps=SGLD["steps"]):
    seconds, walls, results = [], [], []

    def once():
        start = time.perf_counter()
        result = run()
        walls.append(time.perf_counter() - start)
        seconds.append(result.sampling_seconds)
        results.append(result)

    benchmark.pedantic(once, rounds=1, iterations=1)
    record(benchmark, label, WORKLOAD, chains, steps, seconds, wall_seconds=round(walls[0], 2),
           peak_rss_mib=round(peak_rss_mib()))
    ROWS[f"{label} C{chains}"] = dict(rate=chains * steps / seconds[0], wall=walls[0], rss=peak_rss_mib(),
                                      llc=results[0].llc_mean)
    return results[0]


def test_both_ways_agree_before_timing(benchmark, trained):
    model, tokens = trained
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # --benchmark-only runs only benchmarks
    sub = tokens[:512]
    naive, ours = run_naive(model, sub, 2), run_lm(model, sub, 2)
    assert naive.init_loss == pytest.approx(ours.init_loss, rel=1e-5)  # fp32 rounding: SDPA/eager, GELU spellings
    assert 0 < ours.llc_mean < 3 * naive.llc_mean + 10 and 0 < naive.llc_mean < 3 * ours.llc_mean + 10


@pytest.mark.parametrize("chains", [4, 16])
def test_fastllc_lm_beside_naive_wrapper(benchmark, trained, chains):
    """Both ways in alternation, ROUNDS rounds each (naive, lm, naive, lm, ...): other processes on a shared
    machine change the rates over minutes, and alternating spreads that over both. Median rate of each."""
    model, tokens = trained
    rates = {"lm-naive-wrapper": [], "fastllc.lm": []}
    walls = {key: [] for key in rates}
    llcs = {}

    def rounds():
        for _ in range(ROUNDS):
            for key, run in (("lm-naive-wrapper", run_naive), ("fastllc.lm", run_lm)):
                start = time.perf_counter()
                result = run(model, tokens, chains)
                walls[key].append(time.perf_counter() - start)
                rates[key].append(result.chain_steps_per_second)
                llcs[key] = result.llc_mean

    benchmark.pedantic(rounds, rounds=1, iterations=1)
    for key in rates:
        seconds = [chains * SGLD["steps"] / r for r in rates[key]]
        benchmark.extra_info[f"{key} rates"] = [round(r, 1) for r in rates[key]]
        ROWS[f"{key} C{chains}"] = dict(rate=statistics.median(rates[key]), wall=statistics.median(walls[key]),
                                        rss=peak_rss_mib(), llc=llcs[key], rates=rates[key])
        record(benchmark, key, WORKLOAD, chains, SGLD["steps"], seconds)


def test_fastllc_lm_eager_attention_only(benchmark, trained):
    """What eager attention alone gives (the spelt-out GELU kept): the attention's share of the speed-up."""
    model, tokens = trained
    timed(benchmark, "fastllc.lm unfused GELU", lambda: lm.estimate(model, tokens, chains=16, fused_gelu=False,
                                                                    **SGLD), 16)


def test_per_head_groups(benchmark, trained):
    """The 8 heads × 2 chains in one batch; compare with 'fastllc.lm C16' (16 unrestricted chains)."""
    model, tokens = trained
    def groups():
        results = lm.estimate_groups(model, tokens, groups="per-head", chains=2, **SGLD)
        first = next(iter(results.values()))
        return type("Run", (), dict(sampling_seconds=first.sampling_seconds, llc_mean=first.llc_mean))
    timed(benchmark, "fastllc.lm per-head 8x2", groups, 16)


RSS_SCRIPT = """
import resource, sys, warnings, torch, torch.nn.functional as F
import fastllc, fastllc.lm as lm
from transformers import AutoModelForCausalLM
warnings.simplefilter("ignore")
model = AutoModelForCausalLM.from_pretrained(sys.argv[2], local_files_only=True).eval()
tokens = torch.load(sys.argv[3])
settings = dict(chains=16, steps=20, batch_size=16, epsilon=5e-5, gamma=1000.0, nbeta=1000.0)
if sys.argv[1] == "naive":
    class Wrapper(torch.nn.Module):
        def __init__(self, m):
            super().__init__(); self.model = m
        def forward(self, x):
            return self.model(x).logits[:, :-1]
    fastllc.estimate(Wrapper(model), (tokens, tokens[:, 1:]), lambda z, y: F.cross_entropy(z.reshape(-1, z.shape[-1]),
                     y.reshape(-1)), backend="generic", **settings)
else:
    lm.estimate(model, tokens, **settings)
print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024)
"""


def test_peak_rss(benchmark, trained, tmp_path):
    """Peak RSS of each way at 16 chains, each in a fresh process (the model and 8,192 sequences loaded)."""
    import subprocess
    import sys
    model, tokens = trained
    model.save_pretrained(tmp_path / "model")
    torch.save(tokens, tmp_path / "tokens.pt")
    peaks = {}

    def measure():
        for way in ("naive", "lm"):
            out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, way, str(tmp_path / "model"),
                                  str(tmp_path / "tokens.pt")], capture_output=True, text=True, check=True)
            peaks[way] = float(out.stdout.strip().splitlines()[-1])
    benchmark.pedantic(measure, rounds=1, iterations=1)
    benchmark.extra_info.update(peak_rss_mib_naive=round(peaks["naive"]), peak_rss_mib_lm=round(peaks["lm"]))
    ROWS["peak RSS MiB, fresh process, C16"] = dict(rate=float("nan"), wall=float("nan"), rss=peaks["lm"],
                                                    llc=float("nan"), peer_rss=peaks["naive"], rates=[])


def test_summary(benchmark, trained):
    """The table of this run, with ratios computed here from the raw rates above."""
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    import platform
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    lines = [f"\ntiny GPT-2 ({WORKLOAD.family()}), {SGLD['steps']} steps, on {cpu}",
             f"{'run':34} {'chain-steps/s':>14} {'wall s':>8} {'peak RSS MiB':>13} {'λ̂':>8}"]
    for key, row in ROWS.items():
        each = ", ".join(f"{r:.0f}" for r in row.get("rates", []))
        lines.append(f"{key:34} {row['rate']:14.1f} {row['wall']:8.1f} {row['rss']:13.0f} {row['llc']:8.2f}"
                     + (f"  (rounds: {each})" if each else ""))
    for chains in (4, 16):
        ours, peer = ROWS.get(f"fastllc.lm C{chains}"), ROWS.get(f"lm-naive-wrapper C{chains}")
        if ours and peer:
            lines.append(f"C={chains}: fastllc.lm / naive wrapper = {ours['rate'] / peer['rate']:.2f}x")
    rss = ROWS.get("peak RSS MiB, fresh process, C16")
    if rss:
        lines.append(f"peak RSS at 16 chains, each in a fresh process: fastllc.lm {rss['rss']:.0f} MiB, naive wrapper "
                     f"{rss['peer_rss']:.0f} MiB")
    heads, plain = ROWS.get("fastllc.lm per-head 8x2 C16"), ROWS.get("fastllc.lm C16")
    if heads and plain:
        lines.append(f"8 heads x 2 chains in one batch / one unrestricted 16-chain run: "
                     f"{plain['rate'] / heads['rate']:.2f}x the sampling time")
    print("\n".join(lines))
