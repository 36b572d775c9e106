"""The p-sweep's runs on the study's own split and minibatch order, with fastllc's initialisations.

    python examples/study_replica.py --out sweeps/study-replica --p 37 --p 53 [--seeds 5] [--chains 16]

The study (nrimsky/devinterp, ``modular_addition/dataset.py`` and ``train.py`` at ecf7995 … c818e82) builds
its data set by iterating a Python ``set`` of the pairs (a, b), shuffles the indices with
``random.seed(0); random.shuffle``, keeps the first int(0.8 p²) for training, and then draws every minibatch
with ``random.choices`` from the same global generator: the split and the whole minibatch sequence are fixed
by ``random_seed = 0`` and shared by the five runs of a p. Its initialisations came from torch's global
generator, never seeded (torch seeds it from the operating system at start-up), so they cannot be
recovered. This script replays the split and the minibatch order exactly (the functions below follow the
study's code line by line; CPython's set order of integer pairs and ``random`` are deterministic), trains
fastllc's initialisation of each seed (``TrainConfig(p, seed).new_model()``: the same starting weights as
the published-settings p-sweep's runs) with ``torch.optim.Adam`` as the study did, and estimates λ̂ with the
p-sweep's published SGLD (+1e-6 chain loss, orthogonal on; ``experiments.sweeps.study_sgld``). With the
initialisations held fixed, what changes between this, the p-sweep as published and
``seed_spread_shared_batches.py`` is the split and the minibatch order alone.

Each run is written as a job record (``<out>/jobs/*.json``, ``batch_order: "study"``) that ``fastllc report``
shows as a settings group of its own. About 13 minutes for the six p on two busy cores (the seeds of a p train as
one stack: ten p = 53 runs in about 5 minutes).
"""

from __future__ import annotations

import argparse
import random
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from fastllc import estimate
from fastllc.analysis.circuits import CIRCUIT_RULE, learned_frequencies
from fastllc.analysis.fourier import fourier_modes
from fastllc.experiments.jobs import chain_locality
from fastllc.experiments.protocol import write_json_atomically
from fastllc.experiments.sweeps import PSWEEP_SEEDS_AT_53, PUBLISHED_PSWEEP, PUBLISHED_PSWEEP_SD, psweep_batches, study_sgld
from fastllc.experiments.report import write_report
from fastllc.train import TrainConfig

STUDY_SEED, TRAIN_FRAC, LR, WEIGHT_DECAY, BATCH = 0, 0.8, 0.01, 2e-4, 64


def study_split(p: int) -> tuple[list[tuple[int, int]], list[int], list[tuple[int, int]], list[int]]:
    """The study's train and test pairs and labels (``make_dataset``, ``train_test_split``), leaving Python's
    global ``random`` where the study's training loop found it."""
    pairs = []
    for i in range(p):
        for j in range(p):
            pairs.append((i, j))
    data = [((a, b), (a + b) % p) for a, b in set(pairs)]
    idx = list(range(len(data)))
    random.seed(STUDY_SEED)
    random.shuffle(idx)
    train, test = [data[i] for i in idx[:int(TRAIN_FRAC * len(data))]], [data[i] for i in idx[int(TRAIN_FRAC * len(data)):]]
    return [x for x, _ in train], [y for _, y in train], [x for x, _ in test], [y for _, y in test]


def batched_logits(weights: dict, pairs: torch.Tensor) -> torch.Tensor:
    """The study's MLP for K weight sets at once ([K, ...] tensors named as ``ModularMLP``'s): logits [K, B, p]."""
    embed = weights["embed.weight"][:, pairs]  # [K, B, 2, e]
    pre = (torch.einsum("kbe,khe->kbh", embed[:, :, 0], weights["left.weight"]) + weights["left.bias"][:, None]
           + torch.einsum("kbe,khe->kbh", embed[:, :, 1], weights["right.weight"]) + weights["right.bias"][:, None])
    return torch.einsum("kbh,kph->kbp", F.gelu(pre), weights["unembed.weight"])


def train_like_the_study(configs: list[TrainConfig]) -> tuple[list[torch.nn.Module], tuple, list[dict]]:
    """fastllc's initialisation of each config (one p), trained by the study's loop: Adam (lr 0.01, coupled
    weight decay 2e-4), minibatches of 64 drawn by ``random.choices`` right after the split's shuffle, the
    same minibatches for every run. The runs train as one stack (Adam is elementwise: the same as one Adam
    per run). Returns the models, the train data and each run's final metrics."""
    train_x, train_y, test_x, test_y = study_split(configs[0].p)  # seeds the study's minibatch stream
    x, y = torch.tensor(train_x), torch.tensor(train_y)
    models = [config.new_model() for config in configs]
    weights = {name: torch.stack([dict(m.named_parameters())[name].detach() for m in models]).requires_grad_()
               for name, _ in models[0].named_parameters()}
    optimiser = torch.optim.Adam(list(weights.values()), lr=LR, weight_decay=WEIGHT_DECAY)
    idx = list(range(len(train_y)))
    for _ in range(configs[0].batches):
        batch = torch.tensor(random.choices(idx, k=BATCH))
        optimiser.zero_grad()
        logits = batched_logits(weights, x[batch])
        F.cross_entropy(logits.flatten(0, 1), y[batch].repeat(len(models)), reduction="sum").div(BATCH).backward()
        optimiser.step()
    with torch.no_grad():
        for k, model in enumerate(models):
            for name, parameter in model.named_parameters():
                parameter.copy_(weights[name][k])
    return models, (x, y), [final_metrics(model, x, y, test_x, test_y, configs[0].batches) for model in models]


def final_metrics(model: torch.nn.Module, x, y, test_x, test_y, step: int) -> dict:
    metrics = dict(step=step)
    with torch.no_grad():
        for name, (inputs, labels) in (("train", (x, y)), ("test", (torch.tensor(test_x), torch.tensor(test_y)))):
            logits = model(inputs)
            metrics[f"{name}_loss"] = F.cross_entropy(logits, labels).item()
            metrics[f"{name}_acc"] = (logits.argmax(1) == labels).float().mean().item()
    return metrics


def record_name(config: TrainConfig) -> str:
    return f"psweep-add-p{config.p}-e8-h32-b{config.batches}-study-split-and-order-seed{config.seed}-final-published-loss"


def replica_record(config: TrainConfig, model: torch.nn.Module, data: tuple, metrics: dict, chains: int) -> dict:
    """One trained run, estimated as the published p-sweep estimates: its job record."""
    sgld = study_sgld(chains, 5000, orthogonal=True, chain_loss="published")
    result = estimate(model, data, F.cross_entropy, sgld).to_dict()
    circuits = learned_frequencies(fourier_modes(model.embed.weight.detach().double().numpy()))
    record = dict(job=record_name(config), sweep="psweep", kind="final", training=dict(asdict(config), split="study"),
                  sgld=sgld.to_dict(), batch_order="study", variant="study replica", result=result,
                  final_metrics=metrics, published=PUBLISHED_PSWEEP.get(config.p),
                  published_sd=PUBLISHED_PSWEEP_SD.get(config.p), circuits=circuits, circuit_count=len(circuits),
                  circuit_rule=CIRCUIT_RULE, circuits_rules_1_2=circuits)
    record.update(chain_locality(result, config.p))
    return record


def run_p(p: int, seeds: int, chains: int, out: Path) -> None:
    """Train the seeds of one p together (unless their records exist) and estimate each."""
    configs = [TrainConfig(p=p, batches=psweep_batches(p), checkpoints=1, seed=seed) for seed in range(seeds)]
    paths = [out / "jobs" / f"{record_name(config)}.json" for config in configs]
    if all(path.exists() for path in paths):
        return
    models, data, metrics = train_like_the_study(configs)
    for config, model, final, path in zip(configs, models, metrics, paths):
        record = replica_record(config, model, data, final, chains)
        write_json_atomically(path, record)
        print(f"p = {p} seed {config.seed}: λ̂ {record['result']['llc_mean']:.1f}, test acc {final['test_acc']:.3f}, "
              f"circuits {record['circuits']}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("sweeps/study-replica"))
    parser.add_argument("--p", type=int, action="append", help="the p to run (repeatable) [default: 37 and 53]")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per p [default: 5, 10 at p = 53]")
    parser.add_argument("--chains", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for p in args.p or [37, 53]:
        run_p(p, args.seeds or (PSWEEP_SEEDS_AT_53 if p == 53 else 5), args.chains, args.out)
    print(write_report(args.out).read_text())


if __name__ == "__main__":
    main()
