"""Sweeps: one JSON per job, written atomically, resumable; reports from the JSONs; quick reproductions."""

import json
import math

import numpy as np
import pytest

from fastllc import SGLDConfig, TrainConfig
from fastllc.experiments import Job, load_records, run_sweep, write_report
from fastllc.experiments import executors as executors_module
from fastllc.experiments import jobs as jobs_module
from fastllc.experiments.report import linear_fit
from fastllc.experiments.sweeps import memorization, psweep


def tiny_jobs():
    sgld = SGLDConfig(chains=2, steps=20, orthogonal=True)
    return [Job("psweep", TrainConfig(p=p, embed=4, hidden=8, batches=30, checkpoints=2), sgld, tags=dict(published=None))
            for p in (5, 7)]


def test_sweep_writes_one_json_per_job_and_skips_finished_ones(tmp_path, monkeypatch):
    records = run_sweep(tiny_jobs(), tmp_path, progress=False)
    files = sorted((tmp_path / "jobs").glob("*.json"))
    assert len(files) == 2 and len(records) == 2
    assert not list((tmp_path / "jobs").glob(".*"))  # no temporary files left
    first = json.loads(files[0].read_text())
    assert first["result"]["chains"] == 2 and "circuit_count" in first

    def refuse(*args, **kwargs):
        raise AssertionError("a finished job ran again")

    monkeypatch.setattr(jobs_module, "run_job", refuse)
    assert run_sweep(tiny_jobs(), tmp_path, progress=False) == records


def test_an_interrupted_sweep_keeps_finished_jobs(tmp_path, monkeypatch):
    real = jobs_module.run_job
    calls = []

    def fail_second(job, out, progress=False):
        calls.append(job.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(job, out, progress)

    monkeypatch.setattr(jobs_module, "run_job", fail_second)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(tiny_jobs(), tmp_path, progress=False)
    assert len(load_records(tmp_path)) == 1
    monkeypatch.setattr(jobs_module, "run_job", real)
    assert len(run_sweep(tiny_jobs(), tmp_path, progress=False)) == 2


def test_dynamics_job_estimates_every_checkpoint(tmp_path):
    job = Job("dynamics", TrainConfig(p=5, embed=4, hidden=8, batches=30, checkpoints=3), SGLDConfig(chains=2, steps=20),
              kind="dynamics")
    (record,) = run_sweep([job], tmp_path, progress=False)
    assert len(record["results"]) == len(record["steps"]) == 4
    report = write_report(tmp_path).read_text()
    assert "λ̂ along training" in report and (tmp_path / "dynamics.png").exists()


def test_report_is_rebuilt_from_the_jsons(tmp_path):
    run_sweep(tiny_jobs(), tmp_path, progress=False)
    text = write_report(tmp_path).read_text()
    assert "| 5 |" in text and "| 7 |" in text and "Linear fit" in text
    assert (tmp_path / "psweep.png").stat().st_size > 5000
    assert "circuits against λ̂" in text and (tmp_path / "circuits.png").stat().st_size > 5000


def test_seeds_of_one_configuration_train_together(tmp_path, monkeypatch):
    sgld = SGLDConfig(chains=2, steps=5)
    jobs = [Job("psweep", TrainConfig(p=5, embed=4, hidden=8, batches=10, checkpoints=1, seed=s), sgld) for s in (0, 1, 2)]
    jobs.append(Job("psweep", TrainConfig(p=7, embed=4, hidden=8, batches=10, checkpoints=1), sgld))
    groups = []
    real = executors_module.train_together

    def spy(configs, outs, progress=False, **options):
        groups.append(sorted((c.p, c.seed) for c in configs))
        return real(configs, outs, progress, **options)

    monkeypatch.setattr(executors_module, "train_together", spy)
    assert len(run_sweep(jobs, tmp_path, progress=False)) == 4
    assert sorted(groups) == [[(5, 0), (5, 1), (5, 2)], [(7, 0)]]


def test_linear_fit_on_a_line():
    slope, intercept, r2 = linear_fit([1, 2, 3], [5, 7, 9])
    assert (slope, intercept, r2) == pytest.approx((2.0, 3.0, 1.0))


@pytest.mark.slow
def test_quick_reproduction_shows_the_qualitative_claims(tmp_path):
    """λ̂ grows with p for modular addition; a memorising network has higher λ̂ than a generalising one."""
    grow = run_sweep(psweep(chains=8, seeds=1, quick=True), tmp_path / "p", progress=False)
    ps = [r["training"]["p"] for r in grow]
    llc = [r["result"]["llc_mean"] for r in grow]
    assert np.all(np.diff(np.array(llc)[np.argsort(ps)]) > 0)
    assert linear_fit(ps, llc)[2] > 0.9
    # the published settings only: one job per (task, p) below, and the test's cost as before the variants
    memo = run_sweep(memorization(chains=8, seeds=1, quick=True, variants=["published"]), tmp_path / "m", progress=False)
    by = {(r["training"]["task"], r["training"]["p"]): r["result"]["llc_mean"] for r in memo}
    assert by[("random", 17)] > by[("add", 17)]  # measured 165 against 78 (8 chains × 1000 steps)


def test_calibration_grid_runs_as_one_batch(tmp_path):
    grid = [dict(epsilon=e, nbeta=1.0, gamma=5.0) for e in (1e-4, 1e-3)] + [dict(epsilon=50.0, nbeta=1.0, gamma=5.0)]
    job = Job("calibrate", TrainConfig(p=5, embed=4, hidden=8, batches=30, checkpoints=1), SGLDConfig(chains=2, steps=30),
              kind="calibrate", tags=dict(grid=grid))
    with pytest.warns(RuntimeWarning):  # the ε = 50 cell diverges
        (record,) = run_sweep([job], tmp_path, progress=False)
    cells = record["cells"]
    assert [c["epsilon"] for c in cells] == [1e-4, 1e-3, 50.0]
    assert cells[0]["healthy_fraction"] == 1.0 and cells[2]["healthy_fraction"] == 0.0
    text = write_report(tmp_path).read_text()
    assert "calibration grid" in text and text.count("\n| 5 | 1 | ") == 3  # one row per cell (γ = 5, nβ × 1)


def test_memorisation_report_fits_all_runs_and_beside_them_the_runs_that_memorised(tmp_path):
    def record(p, seed, llc, train_acc):
        return dict(job=f"m{p}-{seed}", sweep="memorization", kind="final", training=dict(p=p, task="random", seed=seed),
                    result=dict(llc_mean=llc, llc_se=0.5), final_metrics=dict(train_acc=train_acc), published=None)
    # λ̂ = 0.8 p² exactly for the runs that memorised; one unfinished run at p = 20 far below
    records = [record(p, s, 0.8 * p * p, 1.0) for p in (10, 15, 20, 25) for s in (0, 1)]
    records.append(record(20, 2, 100.0, 0.97))
    for r in records:
        jobs_module.write_json_atomically(tmp_path / "jobs" / f"{r['job']}.json", r)
    text = write_report(tmp_path).read_text()
    assert "Means over seeds (one point per p): fit over p ∈ [10, 25]" in text and "± " in text  # several seeds: sd shown
    assert "Every run (one point per seed): fit over p ∈ [10, 25]" in text and "9 runs)" in text
    assert "Runs that memorised (final train accuracy 100%), 8 of 9" in text
    assert "Runs that memorised, means over seeds: fit over p ∈ [10, 25]: λ̂ ≈ 0.800·p² +0.0 (R² = 1.0000)" in text


def test_architectures_report_gives_seeds_ratios_fits_and_a_plot(tmp_path):
    def record(e, h, p, seed, llc):
        return dict(job=f"a{e}-{h}-{p}-{seed}", sweep="architectures", kind="final",
                    training=dict(p=p, embed=e, hidden=h, task="add", seed=seed), result=dict(llc_mean=llc, llc_se=0.5),
                    published=10.0 * p)
    for e, h, slope in ((8, 32, 8.0), (16, 64, 12.0)):
        for p in (23, 29):
            for seed, noise in ((0, -1.0), (1, 1.0)):
                r = record(e, h, p, seed, slope * p + noise)
                jobs_module.write_json_atomically(tmp_path / "jobs" / f"{r['job']}.json", r)
    text = write_report(tmp_path).read_text()
    assert "| (8, 32) | 23 | 184.0 ± 1.4 (2) | 230 | 0.800 |" in text
    assert "(16, 64): slope 12.00, intercept " in text and "(8, 32): slope 8.00" in text
    assert (tmp_path / "architectures.png").stat().st_size > 5000
    # beside each fit, the published single runs' slope over the same p (10 p here): ours 8 against 10
    assert "published single runs (p = 23, 29): slope 10.00, intercept +0.0; slope ours / published -20.0%" in text


def test_architectures_run_the_inferred_orthogonal_choice_both_ways():
    jobs = {j.tags["variant"]: j for j in architectures() if j.training.p == 37 and j.training.embed == 8}
    off, on = jobs["published"], jobs["published-orth"]
    assert off.training == on.training and (off.sgld.orthogonal, on.sgld.orthogonal) == (False, True)
    assert on.training.batches == 10_000 and on.sgld.chain_loss == "published"
    assert on.name == "architectures-add-p37-e8-h32-b10000-k25-init0.5-seed0-final-published-loss"


# ---- damaged job JSONs, a full disk, progress in a log file ----

import errno
import shutil
import sys

from fastllc import FastLLCError, storage


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    """The two tiny jobs, finished once; tests work on copies."""
    out = tmp_path_factory.mktemp("sweep")
    run_sweep(tiny_jobs(), out, progress=False)
    return out


def copy_of(sweep, tmp_path):
    shutil.copytree(sweep, tmp_path / "sweep")
    return tmp_path / "sweep"


@pytest.mark.parametrize("damage,problem", [
    ("", "unreadable"),  # what a full disk left under older versions
    ('{"job": "psweep-add-p5', "unreadable"),
    ('{"results": []}', "no 'job' field: not a fastllc job record"),
    ('[1, 2]', "not a JSON object"),
])
def test_resuming_over_a_damaged_job_json_moves_it_aside_and_reruns_the_job(finished_sweep, tmp_path, damage, problem):
    out = copy_of(finished_sweep, tmp_path)
    name = tiny_jobs()[0].name
    (out / "jobs" / f"{name}.json").write_text(damage)
    with pytest.warns(RuntimeWarning, match=f"{out / 'jobs' / name}.json is damaged \\({problem}.*\\); moved it to "
                                            f"{name}.json.damaged-.* and running its job again"):
        records = run_sweep(tiny_jobs(), out, progress=False)
    assert [r["job"] for r in records] == [job.name for job in tiny_jobs()]
    assert json.loads((out / "jobs" / f"{name}.json").read_text())["result"]["chains"] == 2
    aside = [p.name for p in (out / "jobs").iterdir() if ".damaged-" in p.name]
    assert len(aside) == 1 and (out / "jobs" / aside[0]).read_text() == damage  # kept for inspection


def test_a_record_of_another_job_is_not_taken_for_this_one(finished_sweep, tmp_path):
    out = copy_of(finished_sweep, tmp_path)
    first, second = (out / "jobs" / f"{job.name}.json" for job in tiny_jobs())
    shutil.copy(second, first)
    with pytest.warns(RuntimeWarning, match="it is the record of another job"):
        records = run_sweep(tiny_jobs(), out, progress=False)
    assert records[0]["training"]["p"] == 5


def test_report_skips_damaged_and_foreign_jsons(finished_sweep, tmp_path):
    out = copy_of(finished_sweep, tmp_path)
    (out / "jobs" / "empty.json").write_text("")
    (out / "jobs" / "other.json").write_text('{"name": "something else"}')
    (out / "jobs" / "future.json").write_text(json.dumps(dict(job="f", sweep="future", kind="final", training=dict(p=5),
                                                              result=dict(llc_mean=1.0))))
    with pytest.warns(RuntimeWarning) as caught:
        text = write_report(out).read_text()
    messages = sorted(str(w.message) for w in caught)
    assert messages == [f"skipping {out / 'jobs' / 'empty.json'}: unreadable: Expecting value: line 1 column 1 (char 0)",
                        f"skipping {out / 'jobs' / 'future.json'}: unknown sweep 'future'",
                        f"skipping {out / 'jobs' / 'other.json'}: no 'job' field: not a fastllc job record"]
    assert "| 5 |" in text and "| 7 |" in text


def test_report_with_nothing_valid_is_one_line(tmp_path):
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "broken.json").write_text("{")
    with pytest.warns(RuntimeWarning, match="broken.json"):
        with pytest.raises(FastLLCError, match=f"^{tmp_path} has no finished jobs to report"):
            write_report(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jobs"]  # no report written


def test_no_r2_for_a_line_through_two_points(finished_sweep, tmp_path):
    text = write_report(copy_of(finished_sweep, tmp_path)).read_text()
    assert "Linear fit of the means" in text and "R² n/a: 2 points" in text and "R² =" not in text
    assert np.isnan(linear_fit([1, 2], [3, 5])[2]) and linear_fit([1, 2], [3, 5])[0] == pytest.approx(2.0)
    assert np.isnan(linear_fit([1, 2, 3], [3, float("nan"), 7])[2])  # a NaN mean is dropped: two points left


def test_report_leaves_pyplot_alone(finished_sweep, tmp_path):
    import matplotlib

    backend, pyplot_loaded = matplotlib.rcParams._get("backend"), "matplotlib.pyplot" in sys.modules
    write_report(copy_of(finished_sweep, tmp_path))
    assert matplotlib.rcParams._get("backend") == backend and ("matplotlib.pyplot" in sys.modules) == pyplot_loaded


def fail_writing_jobs(monkeypatch, suffix):
    real = storage._write_file

    def write(path, data):
        if path.name.endswith(suffix):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(storage, "_write_file", write)


def hidden(folder):
    return [p.name for p in folder.rglob(".*")]


def test_full_disk_during_a_sweep_is_one_line_and_resumable(tmp_path, monkeypatch):
    name = tiny_jobs()[0].name
    real = storage._write_file

    def full_at_job_json(path, data):
        if path.name.startswith(f".{name}.json.tmp-"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(storage, "_write_file", full_at_job_json)
    with pytest.raises(FastLLCError, match=f"^no space left on device while writing {tmp_path / 'jobs' / name}.json"):
        run_sweep(tiny_jobs(), tmp_path, progress=False)
    assert hidden(tmp_path) == [] and list((tmp_path / "jobs").glob("*.json")) == []
    monkeypatch.undo()
    assert len(run_sweep(tiny_jobs(), tmp_path, progress=False)) == 2  # the trained runs are reused


def test_full_disk_while_a_sweep_trains(tmp_path, monkeypatch):
    fail_writing_jobs(monkeypatch, ".pt")
    with pytest.raises(FastLLCError, match=f"^no space left on device while writing {tmp_path / 'runs'}/add-p"):
        run_sweep(tiny_jobs(), tmp_path, progress=False)
    assert hidden(tmp_path) == [] and list((tmp_path / "runs").iterdir()) == []


def test_unwritable_sweep_directory_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(executors_module, "train_together", lambda *a, **k: pytest.fail("trained before checking --out"))
    (tmp_path / "file").write_text("")
    with pytest.raises(FastLLCError, match=f"^cannot write {tmp_path}/file/sweep: {tmp_path}/file is not a directory$"):
        run_sweep(tiny_jobs(), tmp_path / "file" / "sweep", progress=False)
    with pytest.raises(FastLLCError, match="^cannot write /proc/sweep: /proc is not writable"):
        run_sweep(tiny_jobs(), "/proc/sweep", progress=False)


def test_progress_lines_when_not_on_a_terminal(tmp_path, capsys):
    jobs = tiny_jobs()
    run_sweep(jobs[:1], tmp_path, progress="log")
    run_sweep(jobs, tmp_path, progress="auto")  # stderr is captured here: not a terminal, so log lines
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("[training 1/1] add-p5-e4-h8-b30-k2, seed 0 (") and lines[0].endswith(" s)")
    assert lines[1].startswith(f"[1/1] {jobs[0].name}: λ̂ ") and lines[1].endswith(" s)")
    assert lines[2] == f"1 of 2 jobs finished earlier in {tmp_path / 'jobs'}; running 1"
    assert lines[3].startswith("[training 1/1] add-p7") and lines[4].startswith(f"[1/1] {jobs[1].name}: λ̂ ")
    assert len(lines) == 5
    with pytest.raises(FastLLCError, match="progress must be True, False, 'log' or 'auto'"):
        run_sweep(jobs, tmp_path, progress="loud")


def test_a_hand_edited_record_the_report_cannot_read_is_skipped_naming_its_file(tmp_path):
    record = dict(job="j", sweep="psweep", kind="final", training=dict(p=5), result=dict(llc_mean="high", llc_se=None))
    jobs_module.write_json_atomically(tmp_path / "jobs" / "j.json", record)
    with pytest.warns(RuntimeWarning, match=rf"^skipping {tmp_path / 'jobs' / 'j.json'}: result.llc_mean is 'high', not a number$"):
        with pytest.raises(FastLLCError, match=r"has no finished jobs to report"):
            write_report(tmp_path)


# ---- per-figure settings, chain loss, variants side by side ----

import re

from click.testing import CliRunner

from fastllc.cli.reproduce import reproduce_command
from fastllc.experiments.report import settings_label
from fastllc.experiments.sweeps import architectures


def test_each_sweep_runs_its_figures_settings_by_default():
    jobs = psweep()
    by_p = {p: [j for j in jobs if j.training.p == p] for p in (23, 41, 47, 53)}
    assert {j.training.batches for j in by_p[47]} == {10_000} and {j.training.batches for j in by_p[23]} == {10_000}
    assert {j.training.batches for j in by_p[41] + by_p[53]} == {15_000}  # 15,000 only at p = 41 and 53
    assert len(by_p[53]) == 10 and len(by_p[23]) == 5  # p = 53 over 10 seeds
    assert {(j.training.split, j.sgld.chain_loss, j.sgld.orthogonal) for j in jobs} == {("fixed", "published", True)}
    arch = {j.tags["variant"]: j for j in architectures() if j.training.p == 47 and j.training.embed == 8}
    assert (arch["published"].training.init_scale, arch["published"].training.batches, arch["published"].sgld.orthogonal,
            arch["published"].sgld.chain_loss) == (0.5, 10_000, False, "published")
    assert (arch["today"].training.init_scale, arch["today"].training.batches, arch["today"].sgld.orthogonal) == (1.0, 15_000, True)
    memo = [j for j in memorization() if j.training.task == "random" and j.training.p == 25 and j.training.seed == 0]
    settings = {(j.sgld.chain_loss, j.sgld.orthogonal, j.sgld.steps) for j in memo}
    assert settings == {("published", False, 5000), ("exact", False, 5000), ("published", True, 5000), ("exact", True, 5000),
                        ("published", False, 10_000), ("exact", False, 10_000)}  # + the chain-length chains
    assert all(j.tags["prefixes"] == [2000, 5000] for j in memo if j.sgld.steps == 10_000)
    for sweep in (psweep(chain_loss="both"), architectures(), memorization()):
        assert len({j.name for j in sweep}) == len(sweep)  # no two jobs share a JSON


def test_jobs_of_the_earlier_settings_keep_their_names():
    """Exact loss, orthogonal on, 5000 steps, init 1, a split per seed: the JSONs written before the settings
    could vary are found again (docs/results/published/psweep/jobs), not rerun."""
    today = [j for j in psweep(variants=["today"]) if j.training.p == 47 and j.training.seed == 0]
    assert [j.name for j in today] == ["psweep-add-p47-e8-h32-b15000-k25-seed0-final"]
    (published,) = [j for j in psweep() if j.training.p == 47 and j.training.seed == 0]
    assert published.name == "psweep-add-p47-e8-h32-b10000-k25-fixedsplit-seed0-final-published-loss"


def test_split_and_chain_loss_options_override_the_variants():
    jobs = psweep(quick=True, seeds=1, split="per-seed", chain_loss="both")
    assert {(j.training.split, j.sgld.chain_loss) for j in jobs} == {("per-seed", "published"), ("per-seed", "exact")}
    assert {j.tags["variant"] for j in jobs} == {"published", "published with the exact chain loss"}  # recorded as such
    assert {j.sgld.chain_loss for j in memorization(quick=True, seeds=1, chain_loss="exact")} == {"exact"}


def test_a_long_chain_gives_the_shorter_chains_estimates_exactly(tmp_path):
    training = TrainConfig(p=5, task="random", embed=4, hidden=8, batches=30, checkpoints=1)
    short = Job("memorization", training, SGLDConfig(chains=2, steps=20, chain_loss="published"))
    long = Job("memorization", training, SGLDConfig(chains=2, steps=40, chain_loss="published"), tags=dict(prefixes=[20]))
    with pytest.warns(RuntimeWarning, match="batch size 64 is larger"):
        first, second = run_sweep([short, long], tmp_path, progress=False)
    (prefix,) = second["prefix_results"]
    # the same (seed, chain, step) draws: the first 20 records of the long chains are the short chains' records
    assert prefix["llc_mean"] == first["result"]["llc_mean"] and prefix["steps"] == 20
    assert prefix["loss_trace_summary"] == first["result"]["loss_trace_summary"] and prefix["r_hat"] == first["result"]["r_hat"]
    assert second["sgld"]["chain_loss"] == "published" and second["backend_requested"] == "auto"
    assert second["training"]["split"] == "per-seed" and second["training"]["init_scale"] == 1.0


def memo_record(p, seed, llc, loss="published", orthogonal=False, steps=5000, **extra):
    sgld = dict(chain_loss=loss, orthogonal=orthogonal, steps=steps)
    return dict(job=f"m{p}-{seed}-{loss}-{orthogonal}-{steps}", sweep="memorization", kind="final", sgld=sgld,
                training=dict(p=p, task="random", seed=seed), final_metrics=dict(train_acc=1.0),
                result=dict(llc_mean=llc, llc_se=0.5, steps=steps, nbeta=100.0, r_hat=1.01,
                            loss_trace_summary=dict(mean_loss=1.0, first_tenth_mean_loss=1.0, last_tenth_mean_loss=1.5)),
                published={10: 53, 15: 157, 20: 318, 25: 550}.get(p), **extra)


def write_records(folder, records):
    for r in records:
        jobs_module.write_json_atomically(folder / "jobs" / f"{r['job']}.json", r)


def test_memorisation_report_shows_each_chain_loss_and_chain_length_side_by_side(tmp_path):
    published = [memo_record(p, s, 0.9 * p * p, variant="published") for p in (10, 15, 20, 25) for s in (0, 1)]
    exact = [memo_record(p, s, 0.72 * p * p, loss="exact") for p in (10, 15, 20, 25) for s in (0, 1)]
    long = [memo_record(25, s, 600.0, steps=10_000, chain_length_study=True,
                        prefix_results=[dict(memo_record(25, s, 500.0, steps=2000)["result"], r_hat=1.2)])
            for s in (0, 1)]
    write_records(tmp_path, published + exact + long)
    text = write_report(tmp_path).read_text()
    first, second = text.index("#### settings: +1e-6 chain loss (as published), orthogonal off"), \
        text.index("#### settings: exact chain loss, orthogonal off")
    assert first < second  # the published settings first, the principled variant beside them, never merged
    # c is 0 to rounding: printed +0.0 or -0.0
    assert re.search(r"\| \+1e-6 chain loss \(as published\), orthogonal off, a split per seed \| 0\.900 \| [+-]0\.0 \| 1\.0000 \| "
                     r"1\.698 \| 1\.290 \| 1\.132 \| 1\.023 \|", text)
    assert re.search(r"\| exact chain loss, orthogonal off, a split per seed \| 0\.720 \| [+-]0\.0 \| 1\.0000 \|", text)
    assert "fit a ∈ [0.85, 1.05]: met (a = 0.900)" in text and "fit a ∈ [0.85, 1.05]: not met (a = 0.720)" in text
    # chain length: 2000 from the prefixes, 10,000 from the long chains; drift 0.5 nats against λ̂/nβ = 5 or 6
    assert "| +1e-6 chain loss (as published), orthogonal off, a split per seed | 25 | 2000 | 500.0 ± 0.0 (2) | 0.500 | 0.100 | 1.200 |" in text
    assert "| 25 | 10000 | 600.0 ± 0.0 (2) | 0.500 | 0.083 | 1.010 |" in text
    assert (tmp_path / "memorization.png").exists() and (tmp_path / "memorization-exact-chain-loss--orthogonal-off--a-split-per-seed.png").exists()


def test_a_job_json_written_before_chain_losses_reads_as_exact():
    old = dict(job="j", sweep="psweep", kind="final", training=dict(p=5), sgld=dict(orthogonal=True), result=dict(llc_mean=1.0))
    assert settings_label(old) == "exact chain loss, orthogonal on, a split per seed"
    assert settings_label(dict(old, sgld=dict(orthogonal=False, chain_loss="published"),
                               training=dict(p=5, init_scale=0.5, split="fixed"))) == \
        "+1e-6 chain loss (as published), orthogonal off, init ×0.5, one split per p"


def test_psweep_report_gives_convergence_both_sds_and_the_targets(tmp_path):
    def record(p, seed, llc, test_acc=1.0):
        return dict(job=f"p{p}-{seed}", sweep="psweep", kind="final", training=dict(p=p, seed=seed, split="fixed", batches=10_000),
                    sgld=dict(chain_loss="published", orthogonal=True), result=dict(llc_mean=llc, llc_se=0.3),
                    final_metrics=dict(test_acc=test_acc), published=8.6 * p - 90, published_sd=1.0, variant="published")
    records = [record(p, s, 8.6 * p - 90 + (s - 2)) for p in (23, 29, 37) for s in range(5)]
    records += [record(53, s, 366.0 + (4 if s % 2 else -4), test_acc=0.9 if s == 6 else 1.0) for s in range(10)]
    write_records(tmp_path, records)
    text = write_report(tmp_path).read_text()
    assert "| 23 | 107.8 ± 1.6 | 0.30 | 5 | 107.8 (1.0) | 1.000 | [None, None, None, None, None] | 1.6 / 1.4 | 5 of 5 | 10000 |" in text
    assert "| 53 | 366.0 ± 4.2 | 0.30 | 10 | 365.8 (1.0) | 1.001 | " in text and "| 4.2 / 4.0 | 9 of 10 |" in text
    assert "p = 53: 9 of 10 runs converged (convergence rate 90%)" in text and "seed 6: 362.0 (test acc 90.0%)" in text
    assert "p = 53, seeds 0–4 only (the study's count of runs): mean 365.2, sd 3.9 (ddof 0, the published basis) / 4.4 (ddof 1)" in text
    assert "every mean within 5% of the published one: met" in text and "slope 8.6 ± 0.4: met (8.61)" in text
    assert "R² ≥ 0.98 over all runs: met" in text


def cli(args):
    return CliRunner().invoke(reproduce_command, args)


@pytest.mark.parametrize("args,message", [
    (["memorization", "--variant", "fancy"], "Error: --variant fancy: the memorization sweep has variants published, local, "
                                             "e16h64, e16h64-local, exact, published-orth, exact-orth"),
    (["dynamics", "--variant", "published"], "Error: --variant: the dynamics sweep has no settings variants; drop --variant"),
    (["psweep", "--chains", "0"], "Error: --chains must be at least 1, got 0"),
])
def test_reproduce_refuses_bad_settings_in_one_line_before_any_work(tmp_path, args, message):
    result = cli(args + ["--out", str(tmp_path / "sweep")])
    assert result.exit_code == 1 and result.output.strip() == message
    assert not (tmp_path / "sweep").exists()  # nothing trained, nothing written


def test_dynamics_runs_the_published_chain_loss_by_default_and_exact_on_request():
    from fastllc.experiments.sweeps import dynamics
    assert {(j.sgld.chain_loss, j.sgld.orthogonal, j.kind) for j in dynamics()} == {("published", True, "dynamics")}
    assert {j.sgld.chain_loss for j in dynamics(chain_loss="exact")} == {"exact"}
    assert dynamics(chain_loss="exact")[0].name == "dynamics-add-p53-e8-h32-b1500-k25-seed0-dynamics"  # the earlier JSONs' name


def test_reproduce_refuses_a_backend_without_what_the_jobs_need_before_training(tmp_path):
    # dynamics stacks every checkpoint's chains: generic cannot (which backends can depends on the build)
    result = cli(["dynamics", "--quick", "--backend", "generic", "--out", str(tmp_path / "sweep")])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert result.output.startswith("Error: ") and "several starting points in one batch (estimate_checkpoints)" in result.output
    assert "not 'generic'" in result.output
    assert result.output.strip().endswith("; --chain-loss exact runs it with the exact chain loss")  # the way out
    assert not (tmp_path / "sweep").exists()


# ---- reproduce runs through the one sweep driver: the safeguards of `fastllc sweep` ----

from dataclasses import replace

from fastllc.experiments import SWEEPS


def reproduce(monkeypatch, jobs, out):
    """`fastllc reproduce psweep --out OUT` with the psweep's jobs replaced by ``jobs``."""
    monkeypatch.setitem(SWEEPS, "psweep", lambda **options: jobs)
    return cli(["psweep", "--out", str(out)])


def test_reproduce_refuses_a_finished_record_made_with_other_settings(finished_sweep, tmp_path, monkeypatch):
    out = copy_of(finished_sweep, tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "jobs").iterdir()}
    other = [replace(job, sgld=replace(job.sgld, epsilon=2e-3)) for job in tiny_jobs()]  # ε is not in the name
    assert [job.name for job in other] == [job.name for job in tiny_jobs()]
    result = reproduce(monkeypatch, other, out)
    path = out / "jobs" / f"{other[0].name}.json"
    assert result.exit_code == 1 and result.output.strip() == (
        f"Error: {path} holds job {other[0].name} with other settings (sgld.epsilon 0.001 there, 0.002 now); "
        "give another --out, or remove that file to run the job again")
    assert {p.name: p.stat().st_mtime_ns for p in (out / "jobs").iterdir()} == before  # nothing rerun or rewritten


def test_reproduce_refuses_two_jobs_of_one_name_before_any_work(tmp_path, monkeypatch):
    jobs = tiny_jobs()
    result = reproduce(monkeypatch, jobs + jobs[:1], tmp_path / "sweep")
    assert result.exit_code == 1 and result.output.strip() == (
        f"Error: two jobs are named '{jobs[0].name}': each job needs its own name (its JSON file)")
    assert not (tmp_path / "sweep").exists()


def test_reproduce_goes_on_after_a_failed_job_and_exits_1_naming_it(tmp_path, monkeypatch):
    bad = Job("psweep", TrainConfig(p=5, embed=4, hidden=8, batches=30, checkpoints=2, seed=7),
              SGLDConfig(chains=2, steps=20, burn_in=20, orthogonal=True), tags=dict(published=None))
    result = reproduce(monkeypatch, [bad] + tiny_jobs(), tmp_path / "sweep")  # the failing job first
    lines = result.output.splitlines()
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"job {bad.name} failed: burn-in must be in [0, steps) = [0, 20), got 20" in lines
    assert lines[-1] == (f"Error: 1 of 3 jobs failed ({bad.name}); the others are saved: fix the failed jobs' settings "
                         "and rerun (finished jobs are skipped)")
    assert sorted(p.name for p in (tmp_path / "sweep" / "jobs").iterdir()) == sorted(f"{j.name}.json" for j in tiny_jobs())


def test_a_job_of_another_sampler_says_so_in_its_name():
    plain = tiny_jobs()[0]
    rmsprop = replace(plain, sgld=replace(plain.sgld, sampler="rmsprop_sgld"))
    assert plain.name == "psweep-add-p5-e4-h8-b30-k2-seed0-final-T20"  # plain SGLD: the name it always had
    assert rmsprop.name == "psweep-add-p5-e4-h8-b30-k2-seed0-final-rmsprop_sgld-T20"


# ---- locality of the chains ----

from fastllc.experiments.jobs import chain_locality
from fastllc.experiments.report import NOT_RECORDED, record_locality


def local_record(p, seed, mean_loss, init_loss=0.01, **extra):
    """A memorisation job record with the fields an older record has: its chains' mean sampled loss, L_n(w*)."""
    nbeta = 0.8 * p * p / math.log(0.8 * p * p)
    result = dict(llc_mean=nbeta * (mean_loss - init_loss), llc_se=0.5, init_loss=init_loss, nbeta=nbeta,
                  loss_trace_summary=dict(mean_loss=mean_loss, first_tenth_mean_loss=mean_loss * 0.8,
                                          last_tenth_mean_loss=mean_loss * 1.1))
    return dict(job=f"loc{p}-{seed}", sweep="memorization", kind="final", training=dict(p=p, task="random", seed=seed),
                result=result, final_metrics=dict(train_acc=1.0), published=None, **extra)


def test_locality_is_computed_from_an_older_record_and_flagged(tmp_path):
    # p = 10: a mean sampled loss of 3.0 nats is above chance (log 10 = 2.30): locality (3.0 − 0.01)/(2.30 − 0.01)
    far, near = local_record(10, 0, 3.0), local_record(10, 1, 0.3)
    value, source = record_locality(far)
    assert value == pytest.approx((3.0 - 0.01) / (math.log(10) - 0.01)) and source == "computed by the report"
    assert record_locality(near)[0] == pytest.approx(0.29 / (math.log(10) - 0.01))
    write_records(tmp_path, [far, near])
    text = write_report(tmp_path).read_text()
    assert "1 of 2 jobs nonlocal" in text
    assert "| random operation, 10 | 2 | 1.65 | 0.010 | 2.30 | 0.72 (0.13–1.30) | 1 of 2 |" in text
    # λ̂/n and λ̂/p² (n = 80): the chains' own λ̂ = nβ·ΔL
    nbeta = 80 / math.log(80)
    assert f"| {nbeta * (3.0 + 0.3 - 0.02) / 2 / 80:.2f} | {nbeta * (3.0 + 0.3 - 0.02) / 2 / 100:.2f} |" in text


def test_a_record_with_the_field_reads_it_and_one_without_the_loss_reads_not_recorded(tmp_path):
    recorded = local_record(10, 0, 3.0, locality=0.2)  # the record's own field wins over a recomputation
    assert record_locality(recorded) == (0.2, "recorded")
    bare = local_record(15, 0, 1.0)
    del bare["result"]["loss_trace_summary"]
    assert record_locality(bare) == (None, NOT_RECORDED)
    write_records(tmp_path, [bare])
    text = write_report(tmp_path).read_text()
    assert "| random operation, 15 | 1 | – | 0.010 | 2.71 | not recorded | not recorded |" in text
    assert "0 of 0 jobs nonlocal" in text and "1 not recorded" in text


def test_a_job_records_the_locality_of_its_own_chains():
    result = dict(init_loss=0.01, loss_trace_summary=dict(mean_loss=2.0))
    got = chain_locality(result, 10)
    assert got["locality"] == pytest.approx(1.99 / (math.log(10) - 0.01)) and got["nonlocal"] is True
    assert got["trivial_loss"] == pytest.approx(math.log(10))
    assert chain_locality(dict(init_loss=0.01, loss_trace_summary=dict(mean_loss=0.5)), 10)["nonlocal"] is False
    assert chain_locality(dict(init_loss=0.01, loss_trace_summary={}), 10) == {
        "locality": None, "trivial_loss": math.log(10), "nonlocal": None}


def test_a_job_records_its_chain_locality_and_the_circuits_rule_can_recount_it(tmp_path):
    # the job's own chains: locality and the nonlocal flag in the record; recounting from a retrained run
    run_sweep(tiny_jobs(), tmp_path / "sweep", progress=False)
    records = load_records(tmp_path / "sweep")
    assert all("locality" in r and "nonlocal" in r and r["trivial_loss"] == pytest.approx(math.log(r["training"]["p"]))
               for r in records)
    tampered = sorted((tmp_path / "sweep" / "jobs").glob("*.json"))[1]
    record = json.loads(tampered.read_text())
    record["final_metrics"]["train_loss"] += 1e-3  # a record its retrained run does not reproduce
    tampered.write_text(json.dumps(record))
    rows = {row["file"]: row for row in jobs_module.recount_circuits(tmp_path / "sweep", tmp_path / "scratch")}
    assert not rows[tampered.name]["reproduced"] and "circuit_rule" not in json.loads(tampered.read_text())
    (kept,) = [row for name, row in rows.items() if name != tampered.name]
    assert kept["reproduced"] and len(kept["after"]) <= 4 // 2  # e = 4: at most two circuits
    rewritten = json.loads((tmp_path / "sweep" / "jobs" / kept["file"]).read_text())
    assert rewritten["circuit_count"] == len(kept["after"]) and rewritten["circuits_rules_1_2"] == kept["before"]


def test_dynamics_records_each_checkpoints_locality(tmp_path):
    job = Job("dynamics", TrainConfig(p=5, embed=4, hidden=8, batches=30, checkpoints=2), SGLDConfig(chains=2, steps=20),
              kind="dynamics")
    (record,) = run_sweep([job], tmp_path, progress=False)
    assert all("locality" in r and "nonlocal" in r for r in record["results"])
    assert "locality of the chains" in write_report(tmp_path).read_text()


def test_the_local_and_same_architecture_memorisation_variants():
    """γ = 25 (local chains) beside the study's γ = 5, and the study's e16/h64 network on both tasks: each
    job named apart (a γ = 25 job never takes a γ = 5 job's file), the earlier jobs' names unchanged."""
    from fastllc.experiments.sweeps import LOCAL_GAMMA, PUBLISHED_MEMORIZATION_E16H64

    jobs = memorization(variants=["published", "local", "e16h64", "e16h64-local"])
    assert len({j.name for j in jobs}) == len(jobs)
    by = {(j.tags.get("variant"), j.training.task, j.training.p, j.training.seed, j.kind, j.sgld.steps): j for j in jobs}
    published, local = by["published", "random", 25, 0, "final", 5000], by["local", "random", 25, 0, "final", 5000]
    assert published.name == "memorization-random-p25-e50-h200-b10000-k25-seed0-final-published-loss-orth-off"
    assert local.name == published.name + "-g25" and local.sgld.gamma == LOCAL_GAMMA
    assert (local.sgld.epsilon, local.sgld.orthogonal, local.sgld.chain_loss) == (1e-3, False, "published")
    assert local.tags["published"] is None and published.tags["published"] == 550  # published values are γ = 5's
    same = by["e16h64", "random", 35, 0, "final", 5000]
    add = by["e16h64", "add", 35, 0, "final", 5000]
    for job in (same, add):  # one network on both tasks, as the study trained it
        assert (job.training.embed, job.training.hidden, job.training.init_scale, job.training.batches) == (16, 64, 0.5, 20_000)
    assert same.tags["published"] == PUBLISHED_MEMORIZATION_E16H64[35] == 610.2
    assert {p for (v, _, p, *_) in by if v == "e16h64"} == set(PUBLISHED_MEMORIZATION_E16H64)
    # the chain-length chains only at the study's γ; a calibration grid (ε × γ, nβ = n/log n) per local variant
    assert not any(j.sgld.steps == 10_000 for j in jobs if j.tags.get("variant") != "published")
    grids = [j for j in jobs if j.kind == "calibrate"]
    assert [(j.training.p, j.training.embed) for j in grids] == [(25, 50), (35, 16)]
    assert {(c["gamma"], c["nbeta"]) for c in grids[0].tags["grid"]} == {(5.0, 1.0), (25.0, 1.0), (100.0, 1.0)}


def memo_network_record(p, seed, llc, task="random", embed=50, hidden=200, gamma=5.0, mean_loss=1.0, published=False,
                        **extra):
    record = memo_record(p, seed, llc, **extra)
    if published is not False:
        record["published"] = published
    record["training"].update(task=task, embed=embed, hidden=hidden)
    record["sgld"].update(gamma=gamma, epsilon=1e-3)
    record["result"].update(init_loss=0.0)
    record["result"]["loss_trace_summary"]["mean_loss"] = mean_loss
    record["job"] += f"-{task}-{embed}-{gamma}"
    return record


def test_memorisation_report_shows_each_setting_and_network_apart_with_the_claims_evidence(tmp_path):
    # γ = 5: λ̂ = 0.8 p² and chains above chance (mean loss 2 log p); γ = 25: λ̂ = 0.2 p², chains local
    records = [memo_network_record(p, s, 0.8 * p * p, mean_loss=2 * math.log(p), variant="published") for p in (10, 15, 20, 25)
               for s in (0, 1)]
    records += [memo_network_record(p, s, 0.2 * p * p, gamma=25.0, mean_loss=0.2 * math.log(p), published=None)
                for p in (10, 15, 20, 25) for s in (0, 1)]
    records += [memo_network_record(p, 0, 0.1 * p * p, task="add", embed=8, hidden=32, gamma=25.0, published=None)
                for p in (10, 15, 20, 25)]
    records += [memo_network_record(p, 0, 0.5 * p * p, embed=16, hidden=64, published={10: 40.0, 15: 112.5}.get(p))
                for p in (10, 15)]
    write_records(tmp_path, records)
    text = write_report(tmp_path).read_text()
    assert "#### settings: +1e-6 chain loss (as published), orthogonal off, a split per seed, γ = 25\n" in text
    assert "#### settings: +1e-6 chain loss (as published), orthogonal off, a split per seed; e16/h64 on both tasks" in text
    assert "published (e16 h64)" in text and "not judged here" in text  # the 0.8 p² band is the e50/h200 claim's
    # the claim under each setting: λ̂/n = a/0.8, the locality (2 log p / log p = 2; 0.2), memorising over addition 2
    assert re.search(r"\| \+1e-6 chain loss \(as published\), orthogonal off, a split per seed \| 0\.800 \|.*"
                     r"\| 1\.00 \(1\.00–1\.00\) \| 2\.00 \(2\.00–2\.00\) \| 8 of 8 \| – \|", text)
    assert re.search(r"\| \+1e-6 chain loss \(as published\), orthogonal off, a split per seed, γ = 25 \| 0\.200 \|.*"
                     r"\| 0\.25 \(0\.25–0\.25\) \| 0\.20 \(0\.20–0\.20\) \| 0 of 8 \| 2\.00 \(2\.00–2\.00\) \|", text)
    assert (tmp_path / "memorization-1e-6-chain-loss--as-published---orthogonal-off--a-split-per-seed--e16-h64-on-both-tasks.png").exists()


def test_settings_labels_say_what_the_study_never_varied_and_the_data_order():
    base = dict(job="j", sweep="psweep", kind="final", training=dict(p=5, split="fixed"),
                sgld=dict(orthogonal=True, chain_loss="published", gamma=5.0, epsilon=1e-3), result=dict(llc_mean=1.0))
    assert settings_label(base) == "+1e-6 chain loss (as published), orthogonal on, one split per p"  # as before
    assert settings_label(dict(base, sgld=dict(base["sgld"], gamma=25.0, epsilon=1e-4))).endswith(
        "one split per p, γ = 25, ε = 0.0001")
    assert settings_label(dict(base, batch_order="shared")).endswith("one split per p, one batch order per p")
    assert settings_label(dict(base, batch_order="study")).endswith("orthogonal on, the study's own split and minibatch order")


def _example(name):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_seed_spread_examples_change_the_data_order_only():
    import random

    import torch

    shared = _example("seed_spread_shared_batches")
    draws = [torch.randint(100, (5,), generator=shared.shared_batches(seed, "batches")) for seed in (0, 3)]
    assert torch.equal(*draws)  # every seed draws seed 0's minibatches
    assert not torch.equal(torch.rand(3, generator=shared.shared_batches(3, "init")),
                           torch.rand(3, generator=shared.shared_batches(0, "init")))  # other streams untouched
    (job,) = [j for j in shared.jobs(16, [23]) if j.training.seed == 1]
    assert job.name.endswith("-final-published-loss-shared-batches") and job.tags["batch_order"] == "shared"
    replica = _example("study_replica")
    train_x, train_y, test_x, _ = replica.study_split(7)
    assert (len(train_x), len(test_x)) == (39, 10) and all(y == (a + b) % 7 for (a, b), y in zip(train_x, train_y))
    assert sorted(train_x + test_x) == [(a, b) for a in range(7) for b in range(7)]
    after = random.random()
    replica.study_split(7)
    assert random.random() == after  # the split leaves the study's minibatch stream where it always is
    configs = [TrainConfig(p=7, embed=4, hidden=8, batches=5, checkpoints=1, seed=seed) for seed in (0, 1)]
    together, _, _ = replica.train_like_the_study(configs)
    (alone,), _, _ = replica.train_like_the_study(configs[1:])
    assert all(torch.equal(a, b) for a, b in zip(together[1].parameters(), alone.parameters()))  # a stack = one run each


def test_the_psweep_report_compares_the_seed_spread_with_the_published_one(tmp_path):
    from fastllc.experiments.report import f_upper_tail

    assert f_upper_tail(3.0, 2, 2) == pytest.approx(0.25) and f_upper_tail(1.0, 24, 24) == pytest.approx(0.5)
    assert f_upper_tail(2.0, 24, 24) == pytest.approx(0.04805, abs=1e-5)  # by quadrature of the F density and math.isnan(f_upper_tail(2.0, 3, 4))

    def record(p, seed, llc):
        return dict(job=f"s{p}-{seed}", sweep="psweep", kind="final", training=dict(p=p, seed=seed, split="fixed"),
                    sgld=dict(chain_loss="published", orthogonal=True), result=dict(llc_mean=llc, llc_se=0.3),
                    final_metrics=dict(test_acc=1.0), published=100.0, published_sd=1.0)
    # population sd 2.0 over seeds 0–4 at both p (the sixth seed is not the study's count): twice the published
    write_records(tmp_path, [record(p, s, 100.0 + d) for p in (23, 29) for s, d in enumerate((3, -3, 1, -1, 0, 50))])
    text = write_report(tmp_path).read_text()
    assert "2.0 (p = 23), 2.0 (p = 29) times the published sd; pooled over 2 p, variance ratio 4.00 (sd ratio 2.00), " \
           f"F-test on (8, 8) df: one-sided p = {f_upper_tail(4.0, 8, 8):.3f}." in text
