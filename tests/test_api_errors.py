"""The public API on bad input: one-line FastLLCErrors (or a warning) before any sampling, nothing written."""

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastllc
from fastllc import FastLLCError, SGLDConfig, estimate, estimate_checkpoints, estimate_run, resources
from fastllc.compat.devinterp import estimate_learning_coeff_with_summary
from fastllc.seeding import MAX_SEED

GiB = 2**30
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def data(n=80, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=gen), torch.randint(2, (n,), generator=gen)


def frozen_linear():
    model = nn.Linear(3, 2)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.mark.parametrize("model", [nn.Identity(), frozen_linear()], ids=["identity", "frozen"])
def test_a_model_without_trainable_parameters_is_refused(model):
    with pytest.raises(FastLLCError, match=r"^the model has no trainable parameters \(none with requires_grad\): "
                                           "nothing to sample$"):
        estimate(model, data(), chains=2, steps=5)


def poisoned(where):
    model, (x, y) = nn.Linear(3, 2), data()
    if where == "weights":
        with torch.no_grad():
            model.weight[0, 0] = math.nan
    else:
        x[3, 0] = math.inf  # one bad example: every minibatch without it looks fine
    return model, (x, y)


@pytest.mark.parametrize("where", ["weights", "data"])
@pytest.mark.parametrize("backend", ["reference", "generic"])
def test_a_non_finite_loss_at_w_star_is_refused_before_sampling(where, backend):
    model, pair = poisoned(where)
    with pytest.raises(FastLLCError, match=r"^the loss at w\* is nan \(the starting weights or data give a "
                                           r"non-finite loss\); check the model and data$"):
        estimate(model, pair, chains=2, steps=5, backend=backend, randomness=NoDraws())


class NoDraws:
    """Randomness that fails the test if any chain takes a step (every step draws first)."""

    def draw(self, *args):
        pytest.fail("a chain ran")

    fill = draw


@pytest.fixture
def poisoned_run(tiny_run, tmp_path):
    """A copy of the tiny run whose final weights hold a NaN."""
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run.path, run_dir)
    run = fastllc.Run.load(run_dir)
    state = torch.load(run.checkpoint_path(), weights_only=True)
    state["embed.weight"][0, 0] = math.nan
    torch.save(state, run.checkpoint_path())
    return run


def files(root: Path) -> list:
    return sorted(p.relative_to(root) for p in root.rglob("*"))


def test_a_run_with_non_finite_weights_is_refused_by_every_entry_point(poisoned_run):
    before = files(poisoned_run.path)
    for call in (lambda: estimate_run(poisoned_run, None, chains=2, steps=5, batch_size=8),
                 lambda: estimate_checkpoints(poisoned_run, [-1], chains=2, steps=5, batch_size=8)):
        with pytest.raises(FastLLCError, match=r"^the loss at w\* is nan"):
            call()
    assert files(poisoned_run.path) == before


def test_a_loss_that_is_not_one_number_is_refused():
    with pytest.raises(FastLLCError, match=r"^loss_fn must return the mean loss over the examples \(one number\), "
                                           r"got \(80,\)$"):
        estimate(nn.Linear(3, 2), data(), nn.CrossEntropyLoss(reduction="none"), chains=2, steps=5)


@pytest.mark.parametrize("init_loss", [math.nan, math.inf])
def test_a_given_init_loss_must_be_finite(init_loss):
    with pytest.raises(FastLLCError, match=f"^init_loss must be finite, got {init_loss}$"):
        estimate(nn.Linear(3, 2), data(), chains=2, steps=5, init_loss=init_loss)


def test_a_minibatch_larger_than_the_data_is_a_warning_and_still_runs():
    with pytest.warns(RuntimeWarning, match="^batch size 64 is larger than the 20 training examples; "
                                            "minibatches repeat examples$"):
        result = estimate(nn.Linear(3, 2), data(20), chains=2, steps=5, batch_size=64, backend="reference")
    assert result.batch_size == 64 and result.healthy_chains == 2


def test_chains_that_cannot_fit_in_memory_are_refused(monkeypatch, tiny_run):
    monkeypatch.setattr(resources, "available_memory_bytes", lambda device=None: int(7.1 * GiB))
    with pytest.raises(FastLLCError, match="^a run of 100,000,000 chains × 5,000 steps of 8 parameters needs about "
                                           r"58.2 TiB for sampling \(every chain's weights, gradients and loss trace\); "
                                           "7.1 GiB is available: use fewer chains or steps$"):
        estimate(nn.Linear(3, 2), data(), chains=10**8, steps=5000)
    with pytest.raises(FastLLCError, match="^a run of 4,000,000 chains × 100 steps of 260 parameters needs about"):
        estimate_checkpoints(tiny_run, chains=10**6, steps=100, batch_size=8)  # 4 checkpoints' chains in one batch


def test_the_library_and_the_commands_check_memory_with_one_formula(monkeypatch, tiny_run):
    from fastllc.cli.common import require_run_sampling_memory

    asked = []

    def record_and_stop(needed, *words, **where):
        asked.append(needed)
        raise FastLLCError("stop")

    monkeypatch.setattr(resources, "require_memory", record_and_stop)
    config = SGLDConfig(chains=3, steps=7, batch_size=4)
    (pairs, labels), (p, e, h) = tiny_run.task().train_data(), (5, 4, 16)
    for check in (lambda: require_run_sampling_memory(tiny_run.config, config, torch.device("cpu")),
                  lambda: estimate(tiny_run.load_model(), (pairs, labels), config=config)):
        with pytest.raises(FastLLCError, match="^stop$"):
            check()
    d, minibatch = resources.mlp_parameters(p, e, h), resources.mlp_minibatch_bytes(p, e, h, 4)
    at_w_star = resources.full_batch_bytes(p, e, h, len(labels), backward=True)
    assert asked[1] == resources.sampling_bytes(3, 7, d, minibatch, at_w_star)[0]  # the data given: no task
    assert asked[0] == asked[1] + resources.task_bytes(p)  # the command makes the task too


def test_cuda_sampling_is_checked_on_the_device_and_on_the_host(monkeypatch):
    asked = []
    monkeypatch.setattr(resources, "require_memory", lambda needed, subject, purpose, advice, device=None:
                        asked.append((needed, purpose, device)))
    resources.require_sampling_memory(10, 100, 1000, 64, torch.device("cuda", 0), start_bytes=5)
    assert asked == [(5 + 10 * (48 * 1000 + 64) + 4 * 10 * 100, "the chains", torch.device("cuda", 0)),
                     (10 * 128 * 100, "the loss traces", None)]


def test_unknown_available_memory_refuses_nothing(monkeypatch):
    monkeypatch.setattr(resources, "available_memory_bytes", lambda device=None: None)
    resources.require_memory(10**18, "anything", "sampling", "n/a")


def test_available_memory_is_read_from_the_system():
    available = resources.available_memory_bytes()
    if not Path("/proc/meminfo").exists() and available is None:
        pytest.skip("this system does not say how much memory is available")
    assert isinstance(available, int) and 0 < available < 2**60


def test_memory_estimates():
    assert resources.format_bytes(7.1 * GiB) == "7.1 GiB" and resources.format_bytes(3 * 2**40) == "3.0 TiB"
    assert resources.format_bytes(5 * 2**20) == "5 MiB"
    assert resources.mlp_parameters(5, 4, 16) == sum(p.numel() for p in fastllc.ModularMLP(5, 4, 16).parameters())
    # the p² examples' p logits (8·p³ bytes) dominate training for large p: the need grows as p³; the p²
    # terms (672·p² bytes at e = 8, h = 32) move the ratio by under 1% at p = 10⁴
    assert resources.training_bytes(20_000, 8, 32) / resources.training_bytes(10_000, 8, 32) == pytest.approx(8, rel=0.01)
    start, chains = resources.mlp_sampling_bytes(53, 8, 32, 2247, 64, 5000, 64)
    assert start + chains < GiB  # the study's largest estimate stays far from a laptop's memory


@pytest.mark.parametrize("seed,ok", [(0, True), (MAX_SEED, True), (np.int64(7), True), (MAX_SEED + 1, False),
                                     (2**64, False), (2**70, False), (-1, False), (1.5, False), (True, False)])
def test_seeds_are_checked_against_the_generators_range(seed, ok):
    config = SGLDConfig(chains=1, steps=3, batch_size=4, seed=seed)
    if ok:
        assert config.validate() is config
    else:
        with pytest.raises(FastLLCError, match=r"^seed must be an integer in \[0, 2\*\*63 − 1\], got "):
            config.validate()


def test_the_largest_seed_runs():
    result = estimate(nn.Linear(3, 2), data(), chains=1, steps=3, batch_size=4, seed=MAX_SEED, backend="reference")
    assert result.seed == MAX_SEED and result.healthy_chains == 1


def test_devinterp_layer_keeps_an_init_loss_of_zero():
    x, y = data(32)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    out = estimate_learning_coeff_with_summary(nn.Linear(3, 2), loader, evaluate=lambda m, b: F.cross_entropy(m(b[0]), b[1]),
                                               num_chains=2, num_draws=5, init_loss=0.0, seed=0, verbose=False)
    assert out["init_loss"] == 0.0 and out["fastllc"].init_loss == 0.0


@pytest.mark.slow  # trains a small classifier and runs 16 chains × 600 steps: ~10 s on two cores
def test_the_devinterp_example_runs_without_devinterp(tmp_path):
    """``examples/devinterp_switch.py fastllc`` with devinterp made unimportable (it may be installed)."""
    script = (f"import runpy, sys; sys.modules['devinterp'] = None; sys.argv = ['devinterp_switch.py', 'fastllc']; "
              f"runpy.run_path({str(EXAMPLES / 'devinterp_switch.py')!r}, run_name='__main__')")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(fastllc.__file__).parents[1]),
                                                                   os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("['fastllc']: llc/mean = ") and "loss/trace (16, 400)" in result.stdout
    assert sorted(tmp_path.iterdir()) == []
