import json
from dataclasses import asdict

import pytest
import torch

from fastllc import FastLLCError, Run, TrainConfig, train
from fastllc.train import checkpoint_steps, default_batches, train_together


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


# ---- damaged run directories: refused up front, naming the file ----

import errno
import shutil
import os
import subprocess
import sys

from fastllc import storage
import importlib
from fastllc.train import cached_run

train_module = importlib.import_module("fastllc.train")  # `fastllc.train` is also the function


def damaged_copy(run, tmp_path, edit_config=None, edit_metrics=None):
    copy = tmp_path / "copy"
    shutil.copytree(run.path, copy)
    if edit_config is not None:
        record = json.loads((copy / "config.json").read_text())
        edit_config(record)
        (copy / "config.json").write_text(json.dumps(record))
    if edit_metrics is not None:
        lines = (copy / "metrics.jsonl").read_text().splitlines()
        (copy / "metrics.jsonl").write_text("".join(line + "\n" for line in edit_metrics(lines)))
    return copy


def set_key(key, value):
    return lambda record: record.__setitem__(key, value)


@pytest.mark.parametrize("edit,message", [
    (set_key("p", "23"), "config.json: p must be an integer, got '23'"),
    (set_key("p", 23.0), "config.json: p must be an integer, got 23.0"),
    (set_key("hidden", True), "config.json: hidden must be an integer, got True"),
    (set_key("p", -3), "config.json: p must be at least 2, got -3"),
    (set_key("seed", None), "config.json: seed must be an integer, got None"),
    (set_key("lr", float("nan")), "config.json: lr must be a finite number, got nan"),
    (set_key("train_frac", 1.5), "config.json: train_frac must be in (0, 1], got 1.5"),
    (set_key("task", 3), "config.json: task must be a string, got 3"),
    (lambda r: r.pop("seed"), "config.json lacks seed"),
    (set_key("batches", None), "config.json lacks batches"),  # a saved config holds the number it trained
    (lambda r: r.pop("checkpoint_steps"), "config.json lacks checkpoint_steps"),
    (set_key("checkpoint_steps", [0, 40, 20, 60]), "checkpoint_steps must be increasing integers in 0..60"),
    (set_key("checkpoint_steps", [0, "20", 40, 60]), "checkpoint_steps must be increasing integers in 0..60"),
    (set_key("checkpoint_steps", []), "checkpoint_steps must be increasing integers in 0..60"),
])
def test_wrong_config_fields_are_named(tiny_run, tmp_path, edit, message):
    copy = damaged_copy(tiny_run, tmp_path, edit_config=edit)
    with pytest.raises(FastLLCError, match="retrain it") as caught:
        Run.load(copy)
    assert str(caught.value).startswith(str(copy / "config.json")) and message in str(caught.value)


@pytest.mark.parametrize("edit,message", [
    (lambda lines: lines[:3], "metrics.jsonl has 3 lines for 4 checkpoints; the run is incomplete or damaged: retrain it"),
    (lambda lines: lines + lines[-1:], "metrics.jsonl has 5 lines for 4 checkpoints"),
    (lambda lines: [], "metrics.jsonl has 0 lines for 4 checkpoints"),
    (lambda lines: lines[:3] + ['{"step": 60, "train_lo'], "metrics.jsonl line 4 is not JSON"),
    (lambda lines: lines[:3] + ['{"step": 60, "train_loss": 1, "train_acc": 1, "test_loss": "x", "test_acc": 1}'],
     "metrics.jsonl line 4 lacks a numeric test_loss"),
    (lambda lines: lines[:3] + ['[1, 2]'], "metrics.jsonl line 4 lacks a numeric step"),
    (lambda lines: [lines[0], lines[2], lines[1], lines[3]], "metrics.jsonl line 2 is for step 40, but checkpoint 1 is step 20"),
])
def test_metrics_must_match_the_checkpoints(tiny_run, tmp_path, edit, message):
    copy = damaged_copy(tiny_run, tmp_path, edit_metrics=edit)
    with pytest.raises(FastLLCError, match="retrain it") as caught:
        Run.load(copy)
    assert str(caught.value).startswith(str(copy)) and message in str(caught.value)


def test_missing_checkpoint_file_or_config_object(tiny_run, tmp_path):
    copy = damaged_copy(tiny_run, tmp_path)
    (copy / "checkpoints" / "step_00040.pt").unlink()
    with pytest.raises(FastLLCError, match=r"checkpoint file .*step_00040\.pt is missing; the run is incomplete"):
        Run.load(copy)
    (copy / "config.json").write_text("[1, 2]")
    with pytest.raises(FastLLCError, match=r"config\.json is not a JSON object"):
        Run.load(copy)
    (copy / "config.json").write_text("")  # what a full disk leaves
    with pytest.raises(FastLLCError, match=r"config\.json is unreadable"):
        Run.load(copy)
    with pytest.raises(FastLLCError, match="is not a directory"):
        Run.load(copy / "config.json")


def test_config_types_are_checked_before_use():
    with pytest.raises(FastLLCError, match="^p must be an integer, got '5'$"):
        TrainConfig(p="5").validate()
    with pytest.raises(FastLLCError, match="^lr must be a finite number, got inf$"):
        TrainConfig(p=5, lr=float("inf")).validate()


# ---- a full disk, unwritable places and temporaries left by crashes ----

TINY = TrainConfig(p=5, embed=4, hidden=8, batches=30, checkpoints=2)


def fail_writing(monkeypatch, name):
    """The disk fills up while writing the first file called ``name``: half of it lands, then ENOSPC."""
    real = storage._write_file

    def write(path, data):
        if path.name == name:
            with open(path, "xb") as file:
                file.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(storage, "_write_file", write)


@pytest.mark.parametrize("name", ["step_00000.pt", "step_00030.pt", "config.json", "metrics.jsonl"])
def test_full_disk_while_training_keeps_nothing(tmp_path, monkeypatch, name):
    fail_writing(monkeypatch, name)
    out = tmp_path / "runs" / "tiny"
    with pytest.raises(FastLLCError, match=f"^no space left on device while writing {out}: free space and rerun"):
        train(TINY, out)
    assert list((tmp_path / "runs").iterdir()) == []  # neither the run nor its temporary directory


def test_unwritable_output_directories_are_named(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(FastLLCError, match="^cannot write /proc/fastllc-run: /proc is not writable"):
        train(TINY, "/proc/fastllc-run")
    with pytest.raises(FastLLCError, match=f"^cannot write {tmp_path}/file/run: {tmp_path}/file is not a directory$"):
        train(TINY, tmp_path / "file" / "run")
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_training_removes_the_temporaries_of_crashed_trainings(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    stale = tmp_path / f".other.tmp-{child.pid}"
    (stale / "checkpoints").mkdir(parents=True)
    train(TINY, tmp_path / "run")
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


# ---- one run trained by several processes at once: the first finished wins ----

def test_cached_run_trains_once_then_loads(tmp_path):
    notices = []
    first = cached_run(TINY, tmp_path, notice=notices.append)
    again = cached_run(TINY, tmp_path, notice=notices.append)
    assert first.path == again.path == tmp_path / "runs" / TINY.run_name() and again.metrics == first.metrics
    assert notices == [f"training {TINY.run_name()} once (cached in {tmp_path / 'runs'})"]  # once
    (tmp_path / "runs" / "empty").mkdir()  # an empty directory counts as absent
    other = TrainConfig(p=5, embed=4, hidden=8, batches=30, checkpoints=2, seed=1)
    shutil.move(tmp_path / "runs" / "empty", tmp_path / "runs" / other.run_name())
    assert cached_run(other, tmp_path).config == other


def racing(monkeypatch, rival: TrainConfig):
    """Before this process publishes a run, another one publishes ``rival``'s run in the same place."""
    real_finish, raced = train_module._RunWriter.finish, []

    def lose_the_race(writer, steps):
        if not raced:
            raced.append(writer.out)
            train(rival, writer.out)  # the rival's own finish runs unraced
        return real_finish(writer, steps)

    monkeypatch.setattr(train_module._RunWriter, "finish", lose_the_race)


def test_a_run_finished_meanwhile_by_another_process_is_adopted(tmp_path, monkeypatch):
    alone = train(TINY, tmp_path / "alone")
    racing(monkeypatch, TINY)
    run = cached_run(TINY, tmp_path / "home")
    assert [p.name for p in (tmp_path / "home" / "runs").iterdir()] == [TINY.run_name()]  # no temporaries
    assert run.path == tmp_path / "home" / "runs" / TINY.run_name()
    assert run.metrics == alone.metrics  # the same deterministic training, whoever wrote it


def test_another_configuration_finished_meanwhile_is_refused(tmp_path, monkeypatch):
    racing(monkeypatch, TrainConfig(p=7, batches=5, checkpoints=1))
    with pytest.raises(FastLLCError, match=f"^{tmp_path / 'run'} holds a run of another configuration"):
        train(TINY, tmp_path / "run")
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # ours discarded


def test_training_that_cannot_fit_is_refused_by_the_library_too(tmp_path, monkeypatch):
    monkeypatch.setattr("fastllc.resources.available_memory_bytes", lambda device=None: 2**20)  # 1 MiB free
    with pytest.raises(FastLLCError, match=r"^p = 40 needs about .* for training \(the p² = 1,600 pairs\); "
                                           r"1 MiB is available: use a smaller --p$"):
        train(TrainConfig(p=40, batches=5, checkpoints=1), tmp_path / "run")
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


# ---- init scale and split: recorded in the config, old runs keep their names and load ----

def test_init_scale_multiplies_the_embedding_and_first_layer_weights_only():
    plain, half = TrainConfig(p=5, embed=4, hidden=8).new_model(), TrainConfig(p=5, embed=4, hidden=8, init_scale=0.5).new_model()
    for name, weight in plain.state_dict().items():
        factor = 0.5 if name in ("embed.weight", "left.weight", "right.weight") else 1.0  # biases and U untouched
        assert torch.equal(half.state_dict()[name], weight * factor)


def test_fixed_split_shares_the_split_of_seed_0_and_seeds_still_differ():
    fixed = [TrainConfig(p=7, split="fixed", seed=s) for s in (0, 1)]
    assert torch.equal(fixed[0].make_task().train, fixed[1].make_task().train)
    assert torch.equal(fixed[1].make_task().train, TrainConfig(p=7, seed=0).make_task().train)  # seed 0's split
    assert not torch.equal(TrainConfig(p=7, seed=1).make_task().train, fixed[1].make_task().train)  # per-seed differs
    assert not torch.equal(fixed[0].new_model().embed.weight, fixed[1].new_model().embed.weight)  # init still by seed
    table = [TrainConfig(p=7, task="random", split="fixed", seed=s).make_task().labels for s in (0, 3)]
    assert torch.equal(*table)  # a random operation's table is seed 0's too: the data are shared


def test_run_names_change_only_for_settings_away_from_their_defaults():
    assert TrainConfig(p=5, batches=60, checkpoints=3, seed=1).run_name() == "add-p5-e8-h32-b60-k3-seed1"  # as before
    assert TrainConfig(p=5, batches=60, checkpoints=3, seed=1, init_scale=0.5, split="fixed").run_name() == \
        "add-p5-e8-h32-b60-k3-init0.5-fixedsplit-seed1"


def test_the_default_batches_are_the_command_lines():
    """``TrainConfig(p=53)`` is the run ``fastllc train --p 53`` trains: one default, ``default_batches(p)``."""
    from fastllc.cli.common import train_config
    from fastllc.cli.train import train_command

    for p, batches in ((23, 10_000), (40, 10_000), (41, 15_000), (53, 15_000)):
        options = train_command.make_context("train", ["--p", str(p)]).params
        del options["out"]
        assert train_config(**options) == TrainConfig(p=p) == TrainConfig(p=p, batches=batches)
        assert TrainConfig(p=p).batches == default_batches(p) == batches
        assert TrainConfig(p=p).run_name() == f"add-p{p}-e8-h32-b{batches}-k25-seed0"
    assert TrainConfig(p=53, batches=10_000).batches == 10_000  # a number given is kept
    with pytest.raises(FastLLCError, match="^p must be an integer, got '53'$"):
        TrainConfig(p="53").validate()  # a bad p is named, not a TypeError from the default


@pytest.mark.slow
def test_a_run_trained_with_batches_10000_given_is_the_default_configs_run(tmp_path):
    """Runs (and sweep records) saved before ``batches`` defaulted to ``default_batches(p)`` hold 10,000 at
    p < 41, given explicitly: a config that leaves ``batches`` out finds them, in the cache and in records."""
    before = TrainConfig(p=5, embed=4, hidden=8, batches=10_000, checkpoints=1)
    run = cached_run(before, tmp_path)
    now, notices = TrainConfig(p=5, embed=4, hidden=8, checkpoints=1), []
    assert cached_run(now, tmp_path, notice=notices.append).path == run.path and notices == []  # not retrained
    assert Run.load(run.path).config == now
    saved = json.loads((run.path / "config.json").read_text())
    assert saved["batches"] == 10_000  # recorded as a number
    record = json.loads(json.dumps(asdict(before)))  # a job record's "training", written before
    assert record == asdict(now) and TrainConfig(**record) == now


def test_a_run_written_before_init_scale_and_split_existed_loads_with_their_defaults(tiny_run, tmp_path):
    def drop_new_fields(record):
        del record["init_scale"], record["split"]
    run = Run.load(damaged_copy(tiny_run, tmp_path, edit_config=drop_new_fields))
    assert run.config == tiny_run.config and run.config.init_scale == 1.0 and run.config.split == "per-seed"
    assert json.loads((tiny_run.path / "config.json").read_text())["split"] == "per-seed"  # recorded in new runs


@pytest.mark.parametrize("settings,message", [
    (dict(init_scale=0.0), "init_scale must be > 0, got 0.0"),
    (dict(init_scale="half"), "init_scale must be a finite number, got 'half'"),
    (dict(split="shared"), "unknown split 'shared'; choose one of per-seed, fixed"),
    (dict(split=0), "split must be a string, got 0"),
])
def test_bad_init_scale_and_split_are_one_line(settings, message):
    with pytest.raises(FastLLCError) as caught:
        TrainConfig(p=5, **settings).validate()
    assert str(caught.value) == message


def test_train_command_records_init_scale_and_split(tmp_path):
    from click.testing import CliRunner
    from fastllc.cli.train import train_command

    args = ["--p", "5", "--embed", "4", "--hidden", "8", "--batches", "5", "--checkpoints", "1", "--seed", "2"]
    result = CliRunner().invoke(train_command, args + ["--init-scale", "0.5", "--split", "fixed", "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    config = Run.load(tmp_path / "r").config
    assert (config.init_scale, config.split, config.seed) == (0.5, "fixed", 2)
    bad = CliRunner().invoke(train_command, args + ["--init-scale", "-1", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 1 and bad.output.strip() == "Error: init_scale must be > 0, got -1.0"
    assert not (tmp_path / "bad").exists()


# ---- the machine in config.json; portable training: the same bits whatever vector kernels the CPU has ----

def test_config_records_the_cpu_and_its_vector_extensions(tiny_run):
    machine = json.loads((tiny_run.path / "config.json").read_text())["machine"]
    assert set(machine) == {"cpu", "vector_extensions", "torch_cpu_capability", "torch"}
    assert machine["torch_cpu_capability"] in ("DEFAULT", "AVX2", "AVX512") and machine["torch"] == torch.__version__


PORTABLE = TrainConfig(p=7, embed=4, hidden=8, batches=200, checkpoints=1, portable=True)
TRAIN_IN_CHILD = """
import sys, torch
from pathlib import Path
from fastllc import TrainConfig, train
from fastllc.train import _train_batch
config = TrainConfig(p=7, embed=4, hidden=8, batches=200, checkpoints=1, portable=True)
(run,) = _train_batch([config], [Path(sys.argv[1])], False, False)  # in this process, under the environment given
print(torch.backends.cpu.get_cpu_capability())
"""


def test_portable_training_gives_the_same_bits_under_other_vector_kernels(tmp_path):
    """The run trained in a DEFAULT-kernel child equals one trained where MKL is told the CPU has only SSE4.2
    (the nearest this test can come to another CPU: it cannot change the one it runs on)."""
    run = train(PORTABLE, tmp_path / "portable")
    assert run.path.name == "portable" and PORTABLE.run_name().endswith("-portable-seed0")
    assert json.loads((run.path / "config.json").read_text())["machine"]["torch_cpu_capability"] == "DEFAULT"
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default", MKL_CBWR="COMPATIBLE", MKL_ENABLE_INSTRUCTIONS="SSE4_2")
    child = subprocess.run([sys.executable, "-c", TRAIN_IN_CHILD, str(tmp_path / "elsewhere")], env=env,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 0 and child.stdout.split() == ["DEFAULT"], child.stderr
    other = Run.load(tmp_path / "elsewhere")
    for a, b in zip(run.load_model().parameters(), other.load_model().parameters()):
        assert torch.equal(a, b)  # bit for bit, not to a tolerance: that is the mode's promise
    assert [p.name for p in tmp_path.iterdir()] != [] and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
