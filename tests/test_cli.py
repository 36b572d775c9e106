"""The command line: a happy path, and every bad input as a one-line error with a non-zero exit code."""

import json

import pytest
from click.testing import CliRunner

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
    assert second.exit_code == 0 and "training" not in second.output
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


def test_triton_without_cuda_is_a_one_line_error(cli):
    import sys

    import torch
    if torch.cuda.is_available() or getattr(sys.modules.get("fastllc.kernels"), "INTERPRETED", False):
        pytest.skip("this machine (or this test session, through the interpreter) can run the triton backend")
    assert_one_line_error(cli("estimate", "--p", 5, "--backend", "triton"), "the triton backend runs on CUDA")


def test_reproduce_refuses_a_modulus_the_sweep_does_not_have(cli, tmp_path):
    assert_one_line_error(cli("reproduce", "psweep", "--quick", "--p", 99, "--out", tmp_path / "s"),
                          "the psweep sweep has no p = 99; its moduli are [17, 23, 29]")
    assert not (tmp_path / "s").exists()  # refused before any work
