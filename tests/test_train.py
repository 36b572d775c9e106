import json

import pytest
import torch

from fastllc import FastLLCError, Run, TrainConfig, train
from fastllc.train import checkpoint_steps


def test_checkpoint_steps_include_init_and_final():
    assert checkpoint_steps(1500, 25) == list(range(0, 1500, 60)) + [1500]
    assert checkpoint_steps(10, 3) == [0, 3, 6, 10]


def test_run_directory_contents(tiny_run):
    assert tiny_run.steps == [0, 20, 40, 60]
    assert len(tiny_run.metrics) == 4
    assert (tiny_run.path / "config.json").is_file()
    record = json.loads((tiny_run.path / "config.json").read_text())
    assert record["p"] == 5 and record["n_train"] == 20
    for k in range(4):
        assert tiny_run.checkpoint_path(k).is_file()
    assert tiny_run.metrics[-1]["train_loss"] < tiny_run.metrics[0]["train_loss"]  # training lowers loss
    assert not list(tiny_run.path.parent.glob(".*tmp*"))  # no temporary directory left behind


def test_same_seed_same_run(tiny_run, tmp_path):
    again = train(tiny_run.config, tmp_path / "again")
    for k in range(len(tiny_run.steps)):
        a, b = tiny_run.load_model(k).state_dict(), again.load_model(k).state_dict()
        assert all(torch.equal(a[name], b[name]) for name in a)
    assert again.metrics == tiny_run.metrics


def test_refuses_to_overwrite(tiny_run):
    with pytest.raises(FastLLCError, match="already exists"):
        train(tiny_run.config, tiny_run.path)


def test_corrupt_and_missing_checkpoints(tiny_run, tmp_path):
    run = train(tiny_run.config, tmp_path / "damaged")
    run.checkpoint_path(1).write_bytes(b"not a checkpoint")
    with pytest.raises(FastLLCError, match="corrupt"):
        run.load_model(1)
    run.checkpoint_path(2).unlink()
    with pytest.raises(FastLLCError, match="missing"):
        run.load_model(2)
    with pytest.raises(FastLLCError, match="does not exist"):
        run.load_model(9)
    (run.path / "config.json").write_text("{broken")
    with pytest.raises(FastLLCError, match="unreadable"):
        Run.load(run.path)


def test_bad_training_config():
    with pytest.raises(FastLLCError, match="batches must be at least 1"):
        TrainConfig(p=5, batches=0).validate()
