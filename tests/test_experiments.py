"""Sweeps: one JSON per job, written atomically, resumable; reports from the JSONs; quick reproductions."""

import json

import numpy as np
import pytest

from fastllc import SGLDConfig, TrainConfig
from fastllc.experiments import Job, load_records, run_sweep, write_report
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
    real = jobs_module.train_together

    def spy(configs, outs, progress=False, **options):
        groups.append(sorted((c.p, c.seed) for c in configs))
        return real(configs, outs, progress, **options)

    monkeypatch.setattr(jobs_module, "train_together", spy)
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
    memo = run_sweep(memorization(chains=8, seeds=1, quick=True), tmp_path / "m", progress=False)
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
    assert "calibration grid" in text and text.count("| 5 |") == 3


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
    assert "All runs: fit over p ∈ [10, 25]" in text and "± " in text  # several seeds: sd shown
    assert "Runs that memorised (final train accuracy 100%), 8 of 9" in text
    assert "Runs that memorised: fit over p ∈ [10, 25]: λ̂ ≈ 0.800·p² +0.0 (R² = 1.0000)" in text


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
