"""Sweep spec files: a TOML file becomes jobs; `fastllc sweep SPEC` runs them and `fastllc report` reads
them; every bad key is a one-line error naming the file and the key, before any work."""

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from fastllc.cli.reproduce import report_command
from fastllc.cli.sweep import sweep_command
from fastllc.experiments.spec import load_spec

from test_cli import assert_one_line_error

EXAMPLE = Path(__file__).parents[1] / "examples" / "sweep_small.toml"
TINY = """
name = "tiny"
[training]
p = [5, 7]
seeds = 2
embed = 4
hidden = 16
batches = 40
checkpoints = 1
[sgld]
chains = 2
steps = 20
batch_size = 8
"""


@click.group()
def cli_group():
    """The two commands as `fastllc` registers them."""


cli_group.add_command(sweep_command)
cli_group.add_command(report_command)


@pytest.fixture
def cli(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTLLC_HOME", str(tmp_path / "home"))
    runner = CliRunner()
    return lambda *args: runner.invoke(cli_group, [str(a) for a in args])


def write_spec(tmp_path, text: str) -> Path:
    path = tmp_path / "spec.toml"
    path.write_text(text)
    return path


def test_the_example_spec_is_a_grid_of_runs():
    jobs = load_spec(EXAMPLE)
    assert [(j.training.p, j.training.seed) for j in jobs] == [(17, 0), (17, 1), (23, 0), (23, 1), (29, 0), (29, 1)]
    assert {(j.training.batches, j.training.embed, j.training.hidden, j.kind) for j in jobs} == {(10000, 8, 32, "final")}
    assert {(j.sgld.chains, j.sgld.steps, j.sgld.orthogonal) for j in jobs} == {(8, 500, True)}
    assert jobs[0].name == "psweep-add-p17-e8-h32-b10000-k1-seed0-final-T500" and jobs[0].tags["spec"] == "small"


def test_lists_make_a_grid_and_seeds_may_be_listed(tmp_path):
    jobs = load_spec(write_spec(tmp_path, TINY.replace("seeds = 2", "seeds = [3, 9]").replace("hidden = 16", "hidden = [16, 24]")))
    assert [(j.training.p, j.training.hidden, j.training.seed) for j in jobs] == [
        (5, 16, 3), (5, 16, 9), (5, 24, 3), (5, 24, 9), (7, 16, 3), (7, 16, 9), (7, 24, 3), (7, 24, 9)]


def test_sweep_then_report(cli, tmp_path):
    spec = write_spec(tmp_path, TINY)
    result = cli("sweep", spec, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "4 jobs in" in result.output and "| 5 | " in result.output and "| 7 | " in result.output
    assert len(list((tmp_path / "out" / "jobs").glob("*.json"))) == 4
    report = cli("report", tmp_path / "out")
    assert report.exit_code == 0 and "### λ̂ against p" in report.output
    print("\n" + report.output)
    again = cli("sweep", spec, "--out", tmp_path / "out", "--json")  # finished: read back, nothing run
    assert again.exit_code == 0 and [r["job"] for r in json.loads(again.stdout)["records"]] == \
        [j.name for j in load_spec(spec)]


def test_json_output_is_quiet_on_stderr(cli, tmp_path):
    result = cli("sweep", write_spec(tmp_path, TINY.replace("p = [5, 7]", "p = 5")), "--out", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["failed"] == {} and len(record["records"]) == 2 and record["records"][0]["spec"] == "tiny"
    assert result.stderr == ""


def test_a_dynamics_spec_is_reported_along_training(cli, tmp_path):
    spec = TINY.replace("name", 'kind = "dynamics"\nname').replace("checkpoints = 1", "checkpoints = 2") \
        .replace("p = [5, 7]", "p = 5").replace("seeds = 2", "seeds = 1")
    result = cli("sweep", write_spec(tmp_path, spec), "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "λ̂ along training" in result.output and (tmp_path / "out" / "dynamics.png").exists()


BAD_SPECS = [
    ("p = [5, 7]", "p = [5, 5]", "spec.toml: training.p lists 5 twice"),
    ("p = [5, 7]", "p = 'five'", "spec.toml: training.p must be a whole number or a list of them, got 'five'"),
    ("p = [5, 7]", "p = []", "spec.toml: training.p is an empty list; give at least one value"),
    ("p = [5, 7]", "", "spec.toml: training.p is missing: give the modulus, or a list of them"),
    ("p = [5, 7]", "p = 1", "spec.toml: [training] gives an invalid run (add-p1-e4-h16-b40-k1-seed0): p must be at least 2"),
    ("seeds = 2", "seeds = 0", "spec.toml: training.seeds must be a count of at least 1 or a list of seeds, got 0"),
    ("embed = 4", "embedding = 4", "spec.toml: training.embedding is not a setting; known: task, p, seeds"),
    ("batches = 40", "batches = 40.5", "spec.toml: training.batches must be a whole number or a list of them"),
    ("steps = 20", "steps = 0", "spec.toml: [sgld] is invalid: steps must be at least 1, got 0"),
    ("steps = 20", "steps = [20, 40]", "spec.toml: sgld.steps must be a whole number, got [20, 40]"),
    ("steps = 20", "orthogonal = 1", "spec.toml: sgld.orthogonal must be true or false, got 1"),
    ("steps = 20", "chians = 2", "spec.toml: sgld.chians is not a setting; known: chains, steps"),
    ('name = "tiny"', 'name = "tiny"\nkind = "calibrate"', "spec.toml: kind must be one of final, dynamics, got 'calibrate'"),
    ('name = "tiny"', 'name = "tiny"\nreport = "dynamics"', "spec.toml: report must be one of psweep, architectures, "
                                                            "memorization for kind 'final', got 'dynamics'"),
    ('name = "tiny"', 'name = "tiny"\nbackend = "fast"', "spec.toml: backend must be auto or one of"),
    ('name = "tiny"', 'name = "tiny"\ndevice = "gpu"', "spec.toml: device must be cpu, cuda or cuda:N, got 'gpu'"),
    ('name = "tiny"', 'name = "tiny"\nchains = 4', "spec.toml: chains is not a setting; known: name, kind, report"),
    ('name = "tiny"', 'name = tiny', "spec.toml is not valid TOML: "),
]


@pytest.mark.parametrize("old, new, message", BAD_SPECS, ids=[m.split(": ", 1)[1][:40] for *_, m in BAD_SPECS])
def test_a_bad_spec_is_a_one_line_error_naming_file_and_key_before_any_work(cli, tmp_path, old, new, message):
    assert old in TINY or old == 'name = "tiny"'
    result = cli("sweep", write_spec(tmp_path, TINY.replace(old, new)), "--out", tmp_path / "out")
    assert_one_line_error(result, message)
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["spec.toml"]


def test_a_setting_where_a_table_belongs_is_refused(tmp_path):
    from fastllc.errors import FastLLCError

    with pytest.raises(FastLLCError, match=r"spec.toml: sgld must be a table \(\[sgld\]\)"):
        load_spec(write_spec(tmp_path, "sgld = 3\n[training]\np = 5\n"))


def test_the_specs_backend_reaches_every_job_record(cli, tmp_path):
    result = cli("sweep", write_spec(tmp_path, 'backend = "reference"\n' + TINY), "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "out" / "jobs").glob("*.json"))]
    assert records and all(r["backend_requested"] == "reference" for r in records)
    assert all(r["result"]["backend"] == "reference" for r in records)  # and it ran there


def test_missing_spec_and_bad_executor_options(cli, tmp_path):
    assert_one_line_error(cli("sweep", tmp_path / "nope.toml", "--out", tmp_path / "out"),
                          f"sweep spec {tmp_path / 'nope.toml'} does not exist")
    spec = write_spec(tmp_path, TINY)
    assert_one_line_error(cli("sweep", spec, "--out", tmp_path / "out", "--address", "auto"),
                          "--address is for --executor ray")
    assert_one_line_error(cli("sweep", spec, "--out", tmp_path / "out", "--workers", 0), "--workers")
    assert not (tmp_path / "out").exists()
