"""The command line: a happy path, and every bad input as a one-line error with a non-zero exit code."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import fastllc
from fastllc.backends import resolve_backend
from fastllc.cli import main


@pytest.fixture
def cli(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTLLC_HOME", str(tmp_path / "home"))
    runner = CliRunner()
    return lambda *args: runner.invoke(main, [str(a) for a in args])


def assert_one_line_error(result, message):
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], result.output


def test_estimate_json_on_a_run(cli, tiny_run):
    result = cli("estimate", "--run", tiny_run.path, "--chains", 3, "--steps", 40, "--json", "--backend", "reference")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    for key in ("llc_mean", "llc_std", "llc_se", "llc_per_chain", "init_loss", "nbeta", "epsilon", "gamma", "steps",
                "chains", "backend", "device", "healthy_chains", "sampling_seconds", "chain_steps_per_second"):
        assert key in record
    assert record["chains"] == 3 and len(record["llc_per_chain"]) == 3 and record["steps"] == 40
    assert record["nbeta"] == pytest.approx(20 / __import__("math").log(20))  # n_train = 20 for p = 5


def test_estimate_trains_once_and_caches(cli, tmp_path):
    args = ("estimate", "--p", 5, "--embed", 4, "--hidden", 8, "--batches", 30, "--chains", 2, "--steps", 20)
    first = cli(*args)
    assert first.exit_code == 0, first.output
    assert "training add-p5" in first.output and "λ̂" in first.output
    second = cli(*args)
    assert second.exit_code == 0 and "training add-p5" not in second.output
    assert len(list((tmp_path / "home" / "runs").iterdir())) == 1


def test_train_command(cli, tmp_path):
    result = cli("train", "--p", 5, "--batches", 20, "--checkpoints", 2, "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r" / "checkpoints" / "step_00020.pt").is_file()
    assert_one_line_error(cli("train", "--p", 5, "--batches", 20, "--out", tmp_path / "r"), "already exists")


@pytest.mark.parametrize("args,message", [
    (["--p", 1], "p must be at least 2"),
    (["--p", 5, "--chains", 0], "chains must be at least 1"),
    (["--p", 5, "--steps", 0], "steps must be at least 1"),
    (["--p", 5, "--epsilon", 0], "epsilon must be finite and > 0"),
    (["--p", 5, "--epsilon", -1e-3], "epsilon must be finite and > 0"),
    (["--p", 5, "--gamma", -1], "gamma must be finite and >= 0"),
    (["--p", 5, "--nbeta", 0], "nbeta must be finite and > 0"),
    (["--p", 5, "--burn-in", 10, "--steps", 10], "burn-in must be in"),
    (["--p", 5, "--backend", "fast"], "unknown backend 'fast'"),
    (["--p", 5, "--device", "cuda"], "CUDA is not available"),
    (["--run", "/nonexistent/run"], "does not exist"),
    ([], "give the modulus --p"),
])
def test_estimate_bad_input(cli, args, message):
    assert_one_line_error(cli("estimate", *args), message)


def test_train_bad_input(cli, tmp_path):
    assert_one_line_error(cli("train", "--p", 0, "--out", tmp_path / "x"), "p must be at least 2")
    assert_one_line_error(cli("train", "--p", 5, "--batches", 0, "--out", tmp_path / "x"), "batches must be at least 1")


def test_bad_checkpoints(cli, tiny_run, tmp_path):
    import shutil
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_run.path, damaged)
    assert_one_line_error(cli("estimate", "--run", damaged, "--checkpoint", 7), "checkpoint 7 does not exist")
    (damaged / "checkpoints" / "step_00060.pt").write_bytes(b"\x00garbage")
    assert_one_line_error(cli("estimate", "--run", damaged), "is corrupt")
    (damaged / "checkpoints" / "step_00040.pt").unlink()
    assert_one_line_error(cli("estimate", "--run", damaged, "--checkpoint", 2), "is missing")
    (damaged / "config.json").unlink()
    assert_one_line_error(cli("estimate", "--run", damaged), "config.json is missing")


def test_every_chain_diverging_is_an_error_after_the_result(cli, tiny_run):
    result = cli("estimate", "--run", tiny_run.path, "--chains", 2, "--steps", 50, "--epsilon", 100, "--json")
    assert_one_line_error(result, "every chain diverged")
    assert json.loads(result.stdout.splitlines()[0])["healthy_chains"] == 0  # the result is still printed
    assert "warning: 2 of 2 chains diverged" in result.output  # the warnings are not lost to the error


def test_triton_without_cuda_is_a_one_line_error(tmp_path):
    """In a fresh process: in a full test run test_backend_triton.py has loaded Triton's interpreter in this one."""
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine can run the triton backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(fastllc.__file__).parents[1]), env.get("PYTHONPATH")]))
    env["FASTLLC_HOME"] = str(tmp_path / "home")
    result = subprocess.run([sys.executable, "-m", "fastllc.cli", "estimate", "--p", "5", "--backend", "triton"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "the triton backend runs on CUDA" in errors[0], result.stderr
    assert not (tmp_path / "home").exists()  # refused before training


@pytest.mark.parametrize("command,args,message", [
    ("estimate", ["--p", 5, "--seed", 2**64], "seed must be an integer in [0, 2**63 − 1], got 18446744073709551616"),
    ("estimate", ["--p", 5, "--seed", 2**63], "seed must be an integer in [0, 2**63 − 1], got 9223372036854775808"),
    ("estimate", ["--p", 5, "--train-seed", 2**70], "--train-seed must be an integer in [0, 2**63 − 1], got 2^70"),
    ("train", ["--p", 5, "--seed", 2**64], "--train-seed/--seed must be an integer in [0, 2**63 − 1], got 2^64"),
    ("train", ["--p", 5, "--train-seed", -1], "--train-seed/--seed must be an integer in [0, 2**63 − 1], got -1"),
])
def test_seeds_beyond_the_generators_range_are_refused(cli, tmp_path, command, args, message):
    message = message.replace("2^70", str(2**70)).replace("2^64", str(2**64))
    assert_one_line_error(cli(command, *args, "--out" if command == "train" else "--chains", 
                              tmp_path / "out" if command == "train" else 2), message)
    assert sorted(tmp_path.iterdir()) == []  # no run trained, nothing cached


GiB = 2**30


@pytest.fixture
def memory(monkeypatch):
    """This much memory is available, whatever the machine has (for exact messages)."""
    from fastllc import resources
    monkeypatch.setattr(resources, "available_memory_bytes", lambda device=None: int(7.1 * GiB))


@pytest.mark.parametrize("command,args,message", [
    ("estimate", ["--p", 10007],
     "p = 10007 needs about 7.4 TiB for training (the p² = 100,140,049 pairs); 7.1 GiB is available: use a smaller --p"),
    ("train", ["--p", 10007],
     "p = 10007 needs about 7.4 TiB for training (the p² = 100,140,049 pairs); 7.1 GiB is available: use a smaller --p"),
    ("train", ["--p", 5, "--hidden", 10**8], "e = 8, h = 100000000 at p = 5 needs about 174.3 GiB for training "
     "(the weights and Adam's state); 7.1 GiB is available: use a smaller --embed or --hidden"),
    ("estimate", ["--p", 5, "--chains", 10**7], "a run of 10,000,000 chains × 5,000 steps needs about 6.6 TiB for "
     "sampling (every chain's weights, gradients and loss trace); 7.1 GiB is available: use fewer --chains or --steps"),
    ("estimate", ["--p", 900, "--chains", 1, "--steps", 1], "p = 900 needs about 9.5 GiB for sampling (the loss and "
     "gradient at w* over all 648,000 training pairs); 7.1 GiB is available: use a smaller --p"),  # training fits
])
def test_work_that_cannot_fit_in_memory_is_refused_before_it_starts(cli, tmp_path, memory, command, args, message):
    out = ["--out", tmp_path / "out"] if command == "train" else []
    assert_one_line_error(cli(command, *args, *out), message)
    assert sorted(tmp_path.iterdir()) == []  # no run directory, no cache


def test_sampling_a_run_that_cannot_fit_is_refused(cli, tiny_run, memory):
    assert_one_line_error(cli("estimate", "--run", tiny_run.path, "--chains", 10**7, "--steps", 100),
                          "a run of 10,000,000 chains × 100 steps needs about 500.1 GiB for sampling")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, a directory nobody can write")
def test_unwritable_outputs_are_refused_before_training(cli, tmp_path, monkeypatch):
    assert_one_line_error(cli("train", "--p", 5, "--out", "/proc/run"),
                          "cannot write --out /proc/run: /proc is not writable")
    monkeypatch.setenv("FASTLLC_HOME", "/proc/fastllc")
    assert_one_line_error(cli("estimate", "--p", 5), "cannot write the run cache (FASTLLC_HOME) "
                          "/proc/fastllc/runs/add-p5-e8-h32-b10000-k25-seed0: /proc is not writable")


def test_an_output_under_a_file_is_refused(cli, tmp_path):
    (tmp_path / "file").write_text("x")
    assert_one_line_error(cli("train", "--p", 5, "--out", tmp_path / "file" / "run"),
                          f"cannot write --out {tmp_path / 'file' / 'run'}: {tmp_path / 'file'} is not a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("option,value", [("--p", 7), ("--embed", 4), ("--hidden", 8), ("--batches", 3),
                                          ("--task", "random"), ("--train-seed", 0), ("--checkpoints", 2)])
def test_training_options_are_refused_with_a_run(cli, tiny_run, tmp_path, option, value):
    assert_one_line_error(cli("estimate", "--run", tiny_run.path, option, value),
                          f"{option} is ignored with --run (the run fixes the model and its training): drop it")
    assert not (tmp_path / "home").exists()


def test_a_minibatch_larger_than_the_data_is_a_warning(cli, tiny_run):
    result = cli("estimate", "--run", tiny_run.path, "--chains", 2, "--steps", 10, "--batch-size", 64)
    assert result.exit_code == 0, result.output
    assert "warning: batch size 64 is larger than the 20 training examples; minibatches repeat examples" in result.output
    quiet = cli("estimate", "--run", tiny_run.path, "--chains", 2, "--steps", 10, "--batch-size", 20)
    assert quiet.exit_code == 0 and "warning" not in quiet.output


def test_train_takes_seed_and_estimate_keeps_both_seeds(cli, tmp_path):
    result = cli("train", "--p", 5, "--seed", 3, "--batches", 10, "--checkpoints", 1, "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r" / "config.json").read_text())["seed"] == 3
    result = cli("estimate", "--p", 5, "--train-seed", 2, "--batches", 10, "--checkpoints", 1, "--seed", 9,
                 "--chains", 2, "--steps", 10, "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["seed"] == 9 and record["run"].endswith("-seed2")  # SGLD seed 9, training seed 2


def test_long_work_says_when_it_starts_and_ends_without_a_terminal(cli, tmp_path):
    result = cli("train", "--p", 5, "--batches", 10, "--checkpoints", 1, "--out", tmp_path / "r")
    assert "training add-p5-e8-h32-b10-k1-seed0 (10 batches) ..." in result.output and "trained in" in result.output
    result = cli("estimate", "--run", tmp_path / "r", "--chains", 2, "--steps", 10, "--batch-size", 8)
    lines = result.output.splitlines()
    auto = resolve_backend("auto", "cpu")  # native where its kernel builds, else torch
    assert lines[0] == f"sampling 2 chains × 10 steps ({auto} on cpu) ..." and lines[1].startswith("sampled in ")


def test_reproduce_refuses_a_modulus_the_sweep_does_not_have(cli, tmp_path):
    assert_one_line_error(cli("reproduce", "psweep", "--quick", "--p", 99, "--out", tmp_path / "s"),
                          "the psweep sweep has no p = 99; its moduli are [17, 23, 29]")
    assert not (tmp_path / "s").exists()  # refused before any work


def test_rmsprop_sgld_from_the_command_line(cli, tiny_run):
    result = cli("estimate", "--run", tiny_run.path, "--chains", 2, "--steps", 30, "--batch-size", 8,
                 "--sampler", "rmsprop_sgld", "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["sampler"] == "rmsprop_sgld" and record["backend"] == "torch"  # auto: the first that has it
    assert_one_line_error(cli("estimate", "--run", tiny_run.path, "--sampler", "rmsprop_sgld", "--backend", "native"),
                          "sampler='rmsprop_sgld' (RMSProp-preconditioned SGLD) needs backend 'torch' or 'generic' "
                          "or 'reference', not 'native'")
    assert_one_line_error(cli("estimate", "--run", tiny_run.path, "--sampler", "rmsprop_sgld", "--rmsprop-alpha", 1),
                          "rmsprop_alpha must be in (0, 1), got 1.0")


def test_estimate_with_the_control_variate(cli, tiny_run):
    """--control-variate reads the same chains (same seed) with the minibatch control variate: the JSON says so;
    with --per-parameter it is refused in one line."""
    args = ("estimate", "--run", tiny_run.path, "--chains", 3, "--steps", 40, "--json", "--backend", "reference")
    plain, fixed = json.loads(cli(*args).stdout), json.loads(cli(*args, "--control-variate").stdout)
    assert fixed["control_variate"] is True and plain["control_variate"] is False
    assert fixed["chains"] == plain["chains"] == 3 and fixed["llc_mean"] != plain["llc_mean"]
    assert_one_line_error(cli(*args, "--control-variate", "--per-parameter"), "not available with --per-parameter")
