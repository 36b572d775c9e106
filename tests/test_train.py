import json

import pytest
import torch

from fastllc import FastLLCError, Run, TrainConfig, train
from fastllc.train import checkpoint_steps, train_together


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


def autograd_training(config: TrainConfig) -> torch.nn.Module:
    """The textbook loop the batched trainer replaces: autograd and torch.optim.Adam, one run."""
    import torch.nn.functional as F
    from fastllc.seeding import generator

    task, model = config.make_task(), config.new_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    stream, (pairs, labels) = generator(config.seed, "batches"), task.train_data()
    for _ in range(config.batches):
        idx = torch.randint(task.n_train, (config.batch_size,), generator=stream)
        optimizer.zero_grad()
        F.cross_entropy(model(pairs[idx]), labels[idx]).backward()
        optimizer.step()
    return model


def test_batched_trainer_matches_autograd_and_torch_adam(tmp_path):
    config = TrainConfig(p=7, embed=5, hidden=13, batches=40, checkpoints=1, seed=3)
    mine = train(config, tmp_path / "run").load_model().state_dict()
    expected = autograd_training(config).state_dict()
    for name in expected:
        # fp32 gradients agree to a few ulps (different summation order); Adam's steps are normalised
        # (≈ lr = 0.01 each), so 40 of them keep the difference near 40·ulp(0.01·|m/√v|) ≪ 1e-5
        torch.testing.assert_close(mine[name], expected[name], rtol=0, atol=1e-5)


def test_runs_trained_together_are_the_runs_trained_alone(tmp_path):
    configs = [TrainConfig(p=7, embed=5, hidden=13, batches=40, checkpoints=2, seed=s) for s in (0, 1, 2)]
    together = train_together(configs, [tmp_path / f"together{c.seed}" for c in configs])
    for config, run in zip(configs, together):
        alone = train(config, tmp_path / f"alone{config.seed}")
        for k in range(len(alone.steps)):
            a, b = alone.load_model(k).state_dict(), run.load_model(k).state_dict()
            for name in a:
                torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6)  # see the test above
        assert [m["step"] for m in run.metrics] == [m["step"] for m in alone.metrics]


def test_only_seeds_may_differ_in_a_batch(tmp_path):
    with pytest.raises(FastLLCError, match="differ only in their seed"):
        train_together([TrainConfig(p=5), TrainConfig(p=7)], [tmp_path / "a", tmp_path / "b"])


def test_one_distinct_directory_per_run(tmp_path):
    configs = [TrainConfig(p=5, seed=s) for s in (0, 1)]
    with pytest.raises(FastLLCError, match="distinct output directory"):
        train_together(configs, [tmp_path / "same", tmp_path / "same"])
