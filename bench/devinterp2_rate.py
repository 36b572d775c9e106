"""devinterp 2.0.1's ``llc()`` beside ``fastllc.compat.devinterp2.llc()`` with the same arguments, in one process
of devinterp 2.0.1's environment (it cannot share one with devinterp 1.3.2: ``.ci/run`` builds
build/venv-devinterp2), on the LM benchmarks' tiny GPT-2 (``lm_workload``: trained here from the same seed):

    build/venv-devinterp2/bin/python bench/devinterp2_rate.py --chains 4 16 --rounds 2 [--json out.json]

Settings as the issue's measurement: 200 draws, no burn-in, minibatches of 16 sequences, lr 5e-5, nβ 1000,
localization 1000, SGLD, devinterp's other defaults (32 init-loss batches, init_seed 100, the chains' shared
minibatches), on the CPU. The two alternate (devinterp, fastllc, devinterp, ...), ``rounds`` each per chain
count, after one short warm-up call of each; a rate is chain-steps (chains × draws) per second of the whole
call's wall time (what a script pays: L̂_n(w*) included). The sgemm ceiling on torch's threads (all cores) is measured at the start and
the end (best of each). Prints one JSON object (``--json`` also writes it): every round's rates, λ̂ mean and
standard error (std over chains / √chains), fastllc's backend and its sampler-only rate, the CPU, the ceiling and
the load average before and after. ``bench/test_bench_devinterp2.py`` runs this from the main environment."""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import measure_sgemm  # noqa: E402  (the benchmarks' own sgemm measurement)
from lm_workload import SGLD, WORKLOAD, train  # noqa: E402

SETTINGS = dict(lr=SGLD["epsilon"], n_beta=SGLD["nbeta"], localization=SGLD["gamma"], num_draws=SGLD["steps"],
                batch_size=SGLD["batch_size"], num_burnin_steps=0, device="cpu")


def one_call(llc, model, dataset, chains: int, **overrides) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # devinterp's "no output_path" warnings
        start = time.perf_counter()
        result = llc(model, dataset, {}, num_chains=chains, **{**SETTINGS, **overrides})
        wall = time.perf_counter() - start
    per_chain = result["llc_per_chain"].values
    row = dict(wall_s=wall, rate=chains * SETTINGS["num_draws"] / wall, llc=float(result["llc_mean"]),
               se=float(per_chain.std(ddof=1) / math.sqrt(chains)) if chains > 1 else float("nan"))
    if "fastllc" in result.attrs:
        mine = json.loads(result.attrs["fastllc"])
        row.update(backend=mine["backend"], sampling_rate=mine["chain_steps_per_second"])
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chains", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    from datasets import Dataset
    from devinterp.slt.llc import llc as devinterp_llc
    from fastllc.compat.devinterp2 import llc as fastllc_llc
    from fastllc.native_build import cpu_name

    load_before, ceiling_start = os.getloadavg()[0], measure_sgemm()["ceiling"]
    model, tokens = train()
    dataset = Dataset.from_dict({"input_ids": tokens.tolist()}).with_format("torch")
    ways = {"devinterp 2.0.1": devinterp_llc, "fastllc": fastllc_llc}
    for llc in ways.values():  # warm-up: imports, the fused kernels' build, first-call allocations
        one_call(llc, model, dataset, 2, num_draws=2)
    runs = {f"{way} C{c}": [] for c in args.chains for way in ways}
    for chains in args.chains:
        for _ in range(args.rounds):
            for way, llc in ways.items():
                runs[f"{way} C{chains}"].append(one_call(llc, model, dataset, chains))
    out = dict(cpu=cpu_name(), threads=torch.get_num_threads(), workload=WORKLOAD.family(), settings=SETTINGS,
               ceiling_gflops=max(ceiling_start, measure_sgemm()["ceiling"]), flops_per_chain_step=WORKLOAD.flops_per_chain_step(),
               load_before=load_before, load_after=os.getloadavg()[0], runs=runs,
               medians={key: statistics.median(r["rate"] for r in rows) for key, rows in runs.items()})
    text = json.dumps(out, indent=1)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return out


if __name__ == "__main__":
    main()
