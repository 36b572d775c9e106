"""Bad input, each case as a user meets it (the CLI where there is one): a one-line error naming the file
or option and what to do, or a recovery, and nothing left behind (no sweep directory, no job JSON, no
temporary). Huge counts, a damaged run, a damaged record, an all-diverged sweep, wrong API types."""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import fastllc
from fastllc import FastLLCError, Run, TrainConfig, train
from fastllc.cli import main
from fastllc.experiments import Job, run_sweep, write_report
from fastllc.experiments.executors import JobsFailed
from fastllc.experiments.jobs import write_json_atomically
from fastllc.sampling import SGLDConfig
from fastllc.train import cached_run

from test_cli import assert_one_line_error

TINY = TrainConfig(p=5, embed=4, hidden=8, batches=30, checkpoints=2)
SPEC = """
name = "tiny"
[training]
p = [5, 7]
seeds = {seeds}
embed = 4
hidden = 8
batches = 30
checkpoints = 1
[sgld]
chains = {chains}
steps = 20
batch_size = 8
epsilon = {epsilon}
"""


@pytest.fixture
def cli(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTLLC_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    return lambda *args: runner.invoke(main, [str(a) for a in args])


def everything_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


# ---- huge counts: refused against memory before the job list is built ----

def test_huge_seeds_in_reproduce_is_one_line_and_creates_nothing(cli, tmp_path):
    result = cli("reproduce", "psweep", "--quick", "--seeds", 100_000_000_000, "--out", tmp_path / "sweep")
    assert_one_line_error(result, "Error: a sweep of 300,000,000,000 jobs needs about ")
    assert result.output.rstrip().endswith("use fewer --seeds")
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "home").exists()


def test_huge_seeds_count_in_a_spec_names_the_file_and_key(cli, tmp_path):
    (tmp_path / "spec.toml").write_text(SPEC.format(seeds=100_000_000_000, chains=2, epsilon=1e-3))
    result = cli("sweep", tmp_path / "spec.toml", "--out", tmp_path / "sweep")
    assert_one_line_error(result, f"Error: {tmp_path / 'spec.toml'}: training.seeds = 100,000,000,000: a sweep of "
                                  "200,000,000,000 jobs needs about ")
    assert result.output.rstrip().endswith("use a smaller count") and not (tmp_path / "sweep").exists()


def test_huge_chains_in_a_sweep_are_refused_before_any_training(cli, tmp_path):
    (tmp_path / "spec.toml").write_text(SPEC.format(seeds=1, chains=100_000_000_000, epsilon=1e-3))
    result = cli("sweep", tmp_path / "spec.toml", "--out", tmp_path / "sweep")
    assert_one_line_error(result, "(100,000,000,000 chains × 20 steps) needs about ")
    assert "use fewer chains or steps (--chains, or the spec's [sgld] chains, steps)" in result.output
    assert not (tmp_path / "sweep").exists()  # nothing trained


def test_huge_batch_size_is_told_to_shrink_the_batch_size_not_the_chains(cli, tiny_run):
    result = cli("estimate", "--run", tiny_run.path, "--chains", 2, "--steps", 10, "--batch-size", 10**11)
    assert_one_line_error(result, "use a smaller --batch-size")


# ---- a damaged run: a cached or sweep run recovers; a --run names the one command that retrains it ----

def test_a_cached_run_missing_a_checkpoint_is_moved_aside_and_retrained(tmp_path):
    first = cached_run(TINY, tmp_path)
    (first.path / "checkpoints" / f"step_{first.steps[1]:05d}.pt").unlink()
    with pytest.warns(RuntimeWarning, match=rf"^the run {first.path} is damaged \(checkpoint file .* is missing\); "
                                            rf"moved it to {TINY.run_name()}\.damaged-\S+ and training it again$"):
        again = cached_run(TINY, tmp_path)
    assert again.metrics == first.metrics and Run.load(again.path).steps == first.steps
    names = [p.name for p in (tmp_path / "runs").iterdir()]
    assert sorted(names)[0] == TINY.run_name() and len(names) == 2 and ".damaged-" in sorted(names)[1]  # no temporaries


def test_a_sweep_over_a_damaged_run_retrains_it(tmp_path):
    jobs = [Job("psweep", TINY, SGLDConfig(chains=2, steps=20, batch_size=8), tags=dict(published=None))]
    (first,) = run_sweep(jobs, tmp_path, progress=False)
    (tmp_path / "jobs" / f"{jobs[0].name}.json").unlink()
    shutil.rmtree(tmp_path / "runs" / TINY.run_name() / "checkpoints")
    with pytest.warns(RuntimeWarning, match="is damaged"):
        (again,) = run_sweep(jobs, tmp_path, progress=False)
    assert again["result"]["llc_mean"] == first["result"]["llc_mean"]  # the same deterministic training


def test_a_damaged_run_directory_names_the_command_that_retrains_it(cli, tmp_path):
    run = train(TINY, tmp_path / "run")
    (run.path / "checkpoints" / f"step_{run.steps[-1]:05d}.pt").unlink()
    result = cli("estimate", "--run", run.path, "--chains", 2, "--steps", 10)
    assert_one_line_error(result, "is missing; the run is incomplete or damaged: retrain it with: mv ")
    command = result.output.split("retrain it with: ")[1].strip()
    assert command == (f"mv {run.path} {run.path}.damaged && fastllc train --p 5 --embed 4 --hidden 8 --batches 30 "
                       f"--checkpoints 2 --out {run.path}")
    mv, train_command = command.split(" && ")
    os.rename(*shlex.split(mv)[1:])  # what the user runs
    assert cli(*shlex.split(train_command)[1:]).exit_code == 0
    assert Run.load(run.path).metrics == run.metrics


def test_a_checkpoint_with_code_is_refused_as_unsafe_before_sampling(cli, tmp_path):
    run = train(TINY, tmp_path / "run")
    torch.save({"payload": print}, run.path / "checkpoints" / f"step_{run.steps[0]:05d}.pt")  # a pickled function
    result = cli("estimate", "--run", run.path, "--chains", 2, "--steps", 10)
    assert_one_line_error(result, "was refused as unsafe: it holds Python objects or code, not only tensors")
    assert "sampling" not in result.output  # checked by Run.load, before any sampling starts


# ---- a damaged record: the report skips it, naming its file ----

def test_report_skips_records_with_a_bad_or_missing_number(cli, tmp_path):
    jobs = [Job("psweep", TrainConfig(p=p, embed=4, hidden=8, batches=30, checkpoints=1), SGLDConfig(chains=2, steps=20, batch_size=8),
                tags=dict(published=None)) for p in (5, 7, 11)]
    records = run_sweep(jobs, tmp_path / "sweep", progress=False)
    files = [tmp_path / "sweep" / "jobs" / f"{job.name}.json" for job in jobs]
    bad = dict(records[0], result=dict(records[0]["result"], llc_mean="abc"))
    write_json_atomically(files[0], bad)
    lacking = dict(records[1], result={k: v for k, v in records[1]["result"].items() if k != "llc_se"})
    write_json_atomically(files[1], lacking)
    result = cli("report", tmp_path / "sweep")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: skipping {files[0]}: result.llc_mean is 'abc', not a number",
                        f"warning: skipping {files[1]}: no result.llc_se"]
    assert "| 11 |" in result.output and "| 5 |" not in result.output
    assert everything_under(tmp_path / "sweep" / "jobs") == sorted(f.name for f in files)  # the files are kept as they were


# ---- a sweep in which every job diverged: exit status 1, said once, no job recorded as finished ----

def test_all_diverged_sweep_exits_1_and_records_nothing(cli, tmp_path):
    (tmp_path / "spec.toml").write_text(SPEC.format(seeds=1, chains=2, epsilon=10.0))
    result = cli("sweep", tmp_path / "spec.toml", "--out", tmp_path / "sweep")
    assert result.exit_code == 1 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith("Error: 2 of 2 jobs failed (")
    assert errors[0].endswith("): every chain diverged (non-finite or exploding loss), no λ̂; try a smaller "
                              "sgld.epsilon (it is 10); none finished: fix the failed jobs' settings and rerun "
                              "(finished jobs are skipped)")
    assert not (tmp_path / "sweep" / "jobs").exists() or not list((tmp_path / "sweep" / "jobs").iterdir())
    assert "RuntimeWarning" not in result.output and "Mean of empty slice" not in result.output


def test_all_diverged_jobs_in_process_fail_the_sweep_too(tmp_path):
    diverging = SGLDConfig(chains=2, steps=20, batch_size=8, epsilon=10.0)
    jobs = [Job("psweep", TINY, diverging, tags=dict(published=None)),
            Job("psweep", TrainConfig(p=7, embed=4, hidden=8, batches=30, checkpoints=2), SGLDConfig(chains=2, steps=20, batch_size=8),
                tags=dict(published=None))]
    with pytest.warns(RuntimeWarning), pytest.raises(JobsFailed, match=r"^1 of 2 jobs failed \(") as failed:
        run_sweep(jobs, tmp_path, progress=False)
    assert list(failed.value.failures) == [jobs[0].name] and len(failed.value.records) == 1
    assert [p.name for p in (tmp_path / "jobs").iterdir()] == [f"{jobs[1].name}.json"]


def test_estimate_names_nbeta_when_it_is_what_diverges(cli, tiny_run):
    result = cli("estimate", "--run", tiny_run.path, "--chains", 2, "--steps", 10, "--nbeta", 1e300)
    assert_one_line_error(result, "every chain diverged (non-finite or exploding loss); try a smaller --nbeta (it is "
                                  "1e+300; the default n/log n is ")


# ---- API arguments of the wrong type: one-line FastLLCErrors naming the argument ----

@pytest.mark.parametrize("settings,message", [
    (dict(steps=50.5), "steps must be a whole number, got 50.5"),
    (dict(chains="2"), "chains must be a whole number, got '2'"),
    (dict(batch_size=8.0), "batch_size must be a whole number, got 8.0"),
    (dict(burn_in=None), "burn_in must be a whole number, got None"),
    (dict(epsilon="1e-3"), "epsilon must be a number or one number per chain, got '1e-3'"),
    (dict(nbeta=[1.0, "a"]), "nbeta must be a number or one number per chain, got [1.0, 'a']"),
    (dict(orthogonal="yes"), "orthogonal must be True or False, got 'yes'"),
    (dict(loss_bound="high"), "loss_bound must be a number, got 'high'"),
    (dict(step=10), "'step' is not an SGLD setting; known: "),
    (dict(init_loss="0.1"), "init_loss must be a number, got '0.1'"),
])
def test_api_arguments_of_the_wrong_type_are_one_line_errors(tiny_run, settings, message):
    model, data = tiny_run.load_model(), tiny_run.task().train_data()
    with pytest.raises(FastLLCError, match="^" + message.replace("[", r"\[").replace("(", r"\(")) as caught:
        fastllc.estimate(model, data, **{"chains": 2, "steps": 10, **settings})
    assert "\n" not in str(caught.value)


def test_checkpoint_index_of_the_wrong_type_is_one_line(tiny_run):
    with pytest.raises(FastLLCError, match="^checkpoint must be a whole number, got '1'$"):
        fastllc.estimate_run(tiny_run, checkpoint="1", chains=2, steps=10)


def test_validators_name_the_argument():
    from fastllc.validate import check_bool, check_float, check_int

    assert check_int("--steps", 5, 1) == 5 and check_float("epsilon", 1, above=0) == 1.0
    for call, message in [(lambda: check_int("--steps", 0, 1), "--steps must be at least 1, got 0"),
                          (lambda: check_int("steps", True), "steps must be a whole number, got True"),
                          (lambda: check_float("epsilon", "1e-3"), "epsilon must be a number, got '1e-3'"),
                          (lambda: check_float("epsilon", float("nan")), "epsilon must be finite, got nan"),
                          (lambda: check_float("epsilon", 0.0, above=0), "epsilon must be greater than 0, got 0"),
                          (lambda: check_bool("orthogonal", 1), "orthogonal must be True or False, got 1")]:
        with pytest.raises(FastLLCError, match="^" + message + "$"):
            call()


def test_memory_checks_take_per_chain_settings_and_name_the_api_fields(tmp_path, tiny_run, monkeypatch):
    per_chain = SGLDConfig(chains=2, steps=20, batch_size=8, epsilon=[1e-3, 2e-3])  # a list: not hashable
    (record,) = run_sweep([Job("psweep", TINY, per_chain, tags=dict(published=None))], tmp_path, progress=False)
    assert record["result"]["healthy_chains"] == 2
    monkeypatch.setattr("fastllc.resources.available_memory_bytes", lambda device=None: 2**20)  # 1 MiB free
    with pytest.raises(FastLLCError, match=r"use a smaller batch_size$"):
        fastllc.estimate(tiny_run.load_model(), tiny_run.task().train_data(), chains=2, steps=10, batch_size=10**6)
