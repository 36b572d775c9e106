"""Executors: the same records in process, in local worker processes and as Ray tasks; resume after an
interrupted driver, a killed worker retried, a failing job reported while the others finish."""

import functools
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

from fastllc import SGLDConfig, TrainConfig
from fastllc.errors import FastLLCError
from fastllc.experiments import Job, run_sweep
from fastllc.experiments.executors import JobsFailed, run_jobs
from fastllc.experiments.pools import RAY_MISSING
from fastllc.experiments.spec import EstimateJob

try:
    import ray
except ImportError:  # the ray extra is not installed: the Ray tests below are skipped, saying so
    ray = None

needs_ray = pytest.mark.skipif(ray is None, reason="ray is not installed (pip install -e '.[ray]' runs these)")
TIMING_KEYS = ("sampling_seconds", "chain_steps_per_second")  # wall-clock fields: the only ones that may differ


def tiny_jobs(seeds=(0, 1), ps=(5,), **sgld) -> list[Job]:
    """p = 5 networks trained 40 batches; 2 chains × 20 SGLD steps (a second or two per job)."""
    settings = dict(chains=2, steps=20, batch_size=8) | sgld
    return [Job("psweep", TrainConfig(p=p, embed=4, hidden=16, batches=40, checkpoints=1, seed=seed),
                SGLDConfig(**settings)) for p in ps for seed in seeds]


def numbers(record: dict) -> dict:
    """A record without its wall-clock timings and its run path (which names the sweep directory)."""
    result = {k: v for k, v in record["result"].items() if k not in TIMING_KEYS}
    return {k: v for k, v in record.items() if k != "run"} | dict(result=result)


def leftovers(out: Path) -> list[str]:
    """Temporary files or directories of a write that did not finish."""
    return [str(p) for p in out.rglob(".*") if ".tmp-" in p.name]


# module-level factories: jobs that travel to other processes are pickled by reference

def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))


def tiny_data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(32, 3, generator=generator)
    return inputs, (inputs[:, 0] > 0).long()


def model_that_dies_once(marker: str) -> torch.nn.Module:
    """Kills its worker process the first time (a node lost mid-job); builds the model the next."""
    if not os.path.exists(marker):
        Path(marker).write_text("died once\n")
        os._exit(1)
    return tiny_model()


def estimate_jobs(count: int, **extra) -> list[EstimateJob]:
    return [EstimateJob(f"net{i}", functools.partial(tiny_model, i), tiny_data, SGLDConfig(chains=2, steps=20, batch_size=8),
                        **extra) for i in range(count)]


# ---- local ----

def test_local_executor_gives_run_sweeps_records(tmp_path):
    records = run_jobs(tiny_jobs(), tmp_path / "a", progress=False)
    assert [numbers(r) for r in records] == [numbers(r) for r in run_sweep(tiny_jobs(), tmp_path / "b", progress=False)]
    assert records[0]["run"] == str(tmp_path / "a" / "runs" / tiny_jobs()[0].training.run_name())
    assert run_jobs(tiny_jobs(), tmp_path / "a", progress=False) == records  # finished: read back, nothing run
    assert not leftovers(tmp_path)


def test_local_worker_processes_give_the_same_numbers_and_a_killed_one_is_retried(tmp_path):
    jobs = tiny_jobs(seeds=(0, 1, 2))
    marker = tmp_path / "died"
    dying = EstimateJob("dies-once", functools.partial(model_that_dies_once, str(marker)), tiny_data,
                        SGLDConfig(chains=2, steps=20, batch_size=8))
    in_process = run_jobs(jobs, tmp_path / "a", progress=False)
    workers = run_jobs([dying] + jobs, tmp_path / "b", workers=2, progress=False)
    assert [numbers(r) for r in workers[1:]] == [numbers(r) for r in in_process]  # bit for bit
    assert marker.exists() and workers[0]["job"] == "dies-once" and workers[0]["result"]["llc_mean"] is not None
    print(f"\nlocal worker killed (os._exit) by job dies-once, its jobs rerun in a new pool: {len(workers)} of 4 finished")
    assert not leftovers(tmp_path)


def test_the_numbers_do_not_depend_on_torchs_thread_count(tmp_path):
    """run_job alone differs in the last bits between 1 and 2 torch threads at this shape (L_n(w*) and its
    gradient): the executors run every job single-threaded, so a Ray worker (OMP_NUM_THREADS=1) agrees
    with a driver that has torch's default threads."""
    job = Job("psweep", TrainConfig(p=7, batches=200, checkpoints=1), SGLDConfig(chains=4, steps=50, orthogonal=True,
                                                                                 batch_size=16))
    previous = torch.get_num_threads()
    try:
        records = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            (records[threads],) = run_jobs([job], tmp_path / str(threads), progress=False)
        assert torch.get_num_threads() == 2  # the caller's setting is left as it was
    finally:
        torch.set_num_threads(previous)
    assert numbers(records[1]) == numbers(records[2])


def test_a_failing_job_is_reported_in_one_line_and_the_others_finish(tmp_path, capsys):
    bad = Job("psweep", TrainConfig(p=5, embed=4, hidden=16, batches=40, checkpoints=1, seed=7),
              SGLDConfig(chains=2, steps=20, burn_in=20, batch_size=8))
    with pytest.raises(JobsFailed, match=rf"1 of 3 jobs failed \({re.escape(bad.name)}\); the others are saved") as failed:
        run_jobs(tiny_jobs() + [bad], tmp_path, progress="log")
    lines = [line for line in capsys.readouterr().err.splitlines() if "failed" in line]
    assert lines == [f"job {bad.name} failed: burn-in must be in [0, steps) = [0, 20), got 20"]
    assert failed.value.failures == {bad.name: "burn-in must be in [0, steps) = [0, 20), got 20"}
    assert len(failed.value.records) == 2 and len(list((tmp_path / "jobs").glob("*.json"))) == 2
    assert not leftovers(tmp_path)


def test_an_interrupted_driver_loses_no_finished_job_and_resumes(tmp_path):
    jobs = tiny_jobs(seeds=(0, 1, 2, 3))
    ran = []

    def interrupt_after_two(name, outcome, detail):
        ran.append(name)
        if len(ran) == 2:
            raise KeyboardInterrupt  # Ctrl-C in the driver, between two jobs

    with pytest.raises(KeyboardInterrupt):
        run_jobs(jobs, tmp_path, progress=False, on_record=interrupt_after_two)
    kept = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "jobs").glob("*.json")}
    assert len(kept) == 2 and not leftovers(tmp_path)
    rerun = []
    records = run_jobs(jobs, tmp_path, progress=False, on_record=lambda name, *_: rerun.append(name))
    assert sorted(rerun) == sorted(j.name for j in jobs if j.name not in ran)  # nothing finished is redone
    assert len(records) == 4 and {p.name: p.stat().st_mtime_ns for p in (tmp_path / "jobs").glob("*.json")
                                  if p.name in kept} == kept


# The driver pauses after each finished job, so that the test (polling every 50 ms) kills it after its
# second job however fast the jobs run (with the native kernel the six can finish within one poll).
DRIVER = """
import sys, time
from fastllc import SGLDConfig, TrainConfig
from fastllc.experiments import Job
from fastllc.experiments.executors import run_jobs
jobs = [Job("psweep", TrainConfig(p=5, embed=4, hidden=16, batches=40, checkpoints=1, seed=seed),
            SGLDConfig(chains=2, steps=2000, batch_size=8)) for seed in range(6)]
run_jobs(jobs, sys.argv[1], progress=False, on_record=lambda *_: time.sleep(0.5))
"""


def test_a_driver_killed_outright_resumes_with_every_finished_job_kept(tmp_path):
    import json
    import signal
    import subprocess

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (str(Path(__file__).parents[1]),
                                                                     os.environ.get("PYTHONPATH")))))
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(tmp_path)], env=env)
    try:
        deadline = time.monotonic() + 120
        while len(list((tmp_path / "jobs").glob("*.json"))) < 2 and time.monotonic() < deadline and driver.poll() is None:
            time.sleep(0.05)
    finally:
        driver.send_signal(signal.SIGKILL)  # no cleanup, no finally: as a lost machine or `kill -9`
        driver.wait()
    written = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "jobs").glob("*.json")}
    assert 2 <= len(written) < 6, "the driver finished before it could be killed: make it pause longer"
    for name in written:
        assert json.loads((tmp_path / "jobs" / name).read_text())["result"]["llc_mean"] is not None  # whole
    jobs = [Job("psweep", TrainConfig(p=5, embed=4, hidden=16, batches=40, checkpoints=1, seed=seed),
                SGLDConfig(chains=2, steps=2000, batch_size=8)) for seed in range(6)]
    redone = []
    records = run_jobs(jobs, tmp_path, progress=False, on_record=lambda name, *_: redone.append(name))
    assert len(records) == 6 and len(redone) == 6 - len(written)  # in process, one job was in flight
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "jobs").glob("*.json") if p.name in written} == written
    assert not leftovers(tmp_path)  # the killed driver's temporaries were cleared
    print(f"\ndriver killed (SIGKILL) after {len(written)} of 6 jobs; the rerun ran the other {len(redone)}")


def test_estimate_jobs_of_ones_own_models_run_and_resume(tmp_path):
    records = run_jobs(estimate_jobs(2, tags=dict(note="mine")), tmp_path, progress=False)
    assert [r["job"] for r in records] == ["net0", "net1"] and records[0]["note"] == "mine"
    assert records[0]["kind"] == "estimate" and records[0]["result"]["chains"] == 2
    again = run_jobs(estimate_jobs(2, tags=dict(note="mine")), tmp_path, progress=False,
                     on_record=lambda *_: pytest.fail("a finished job ran again"))
    assert again == records


def test_a_finished_json_made_with_other_settings_is_refused(tmp_path):
    (job,) = run_jobs(tiny_jobs(seeds=(0,)), tmp_path, progress=False)
    (other,) = tiny_jobs(seeds=(0,), epsilon=2e-3)  # ε is not part of a job's name: the same file, other settings
    with pytest.raises(FastLLCError, match=rf"holds job {re.escape(other.name)} with other settings "
                                           r"\(sgld.epsilon 0.001 there, 0.002 now\); give another --out"):
        run_jobs([other], tmp_path, progress=False)


def test_a_job_another_process_finished_meanwhile_is_adopted_not_run_again(tmp_path, capsys):
    from fastllc.experiments.protocol import write_json_atomically

    jobs = tiny_jobs()
    _, theirs = run_jobs(jobs, tmp_path / "theirs", progress=False)

    def finish_the_second(name, outcome, detail):  # as another process would while this one runs the first
        if name == jobs[0].name:
            write_json_atomically(tmp_path / "ours" / "jobs" / f"{jobs[1].name}.json", theirs)

    records = run_jobs(jobs, tmp_path / "ours", progress="log", on_record=finish_the_second)
    assert records[1] == theirs  # the record on disk wins
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1].startswith(f"[2/2] {jobs[1].name}: λ̂ ") and lines[-1].endswith(" s, by another process)")


@pytest.mark.parametrize("options, message", [
    (dict(executor="dask"), "unknown executor 'dask'; choose one of local, ray"),
    (dict(workers=0), "--workers must be a whole number of at least 1, got 0"),
    (dict(address="auto"), "--address is for --executor ray"),
])
def test_bad_executor_options_are_one_line_errors_before_any_work(tmp_path, options, message):
    with pytest.raises(FastLLCError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_jobs(tiny_jobs(), tmp_path / "out", progress=False, **options)
    assert not (tmp_path / "out").exists()


def test_jobs_with_one_name_or_that_cannot_travel_are_refused_before_any_work(tmp_path):
    with pytest.raises(FastLLCError, match=f"two jobs are named '{re.escape(tiny_jobs()[0].name)}'"):
        run_jobs(tiny_jobs() + tiny_jobs(), tmp_path / "out", progress=False)
    local = EstimateJob("local", lambda: tiny_model(), tiny_data)
    with pytest.raises(FastLLCError, match="job 'local' cannot be sent to worker processes .*make its model and data "
                                           "factories module-level functions"):
        run_jobs([local], tmp_path / "out", workers=2, progress=False)
    assert not (tmp_path / "out").exists()


def test_ray_executor_without_ray_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    with pytest.raises(FastLLCError, match=r"--executor ray needs Ray, an optional extra: pip install -e '\.\[ray\]'"):
        run_jobs(tiny_jobs(), tmp_path / "out", executor="ray", progress=False)
    assert RAY_MISSING.count("\n") == 0 and not (tmp_path / "out").exists()


# ---- Ray: one local 2-CPU instance for the module ----

@needs_ray
def test_a_ray_address_where_no_cluster_answers_is_a_one_line_error(tmp_path):
    import socket

    if ray.is_initialized():  # tests run in file order: this one comes before the module's Ray instance
        pytest.skip("needs Ray not yet started in this test session")
    with socket.socket() as probe:  # a loopback port where nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(FastLLCError, match=rf"cannot join the Ray cluster at 127.0.0.1:{port}: nothing answers there "
                                           r"\(connection refused\); start its head with `ray start --head`"):
        run_jobs(tiny_jobs(), tmp_path / "out", executor="ray", address=f"127.0.0.1:{port}", progress=False)
    assert not (tmp_path / "out").exists() and not ray.is_initialized()


@pytest.fixture(scope="module")
def ray_cluster():
    if ray is None:
        pytest.skip("ray is not installed (pip install -e '.[ray]' runs these)")
    here, root = str(Path(__file__).parent), str(Path(__file__).parents[1])
    path = os.pathsep.join(p for p in (here, root, os.environ.get("PYTHONPATH")) if p)  # workers import this module
    started = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             runtime_env=dict(env_vars=dict(PYTHONPATH=path)))
    print(f"\nlocal Ray instance (2 CPUs) started in {time.perf_counter() - started:.1f} s")
    yield
    ray.shutdown()


@needs_ray
def test_ray_gives_bit_identical_numbers_and_its_overhead_per_job(ray_cluster, tmp_path):
    jobs = tiny_jobs(seeds=(0, 1, 2), ps=(5, 7))
    started = time.perf_counter()
    local = run_jobs(jobs, tmp_path / "local", progress=False)
    local_seconds = time.perf_counter() - started
    started = time.perf_counter()
    remote = run_jobs(jobs, tmp_path / "ray", executor="ray", progress=False)  # trains in tasks, ships the runs
    ray_seconds = time.perf_counter() - started
    assert [numbers(r) for r in remote] == [numbers(r) for r in local]  # bit for bit, runs trained on workers
    for job in jobs:  # the shipped runs are the local ones, file for file
        name = job.training.run_name()
        for file in (tmp_path / "local" / "runs" / name).rglob("*.pt"):
            assert (tmp_path / "ray" / "runs" / name / file.relative_to(tmp_path / "local" / "runs" / name)).read_bytes() \
                == file.read_bytes()
    print(f"\n{len(jobs)} jobs with training: local in process {local_seconds:.1f} s, Ray (2 CPUs) {ray_seconds:.1f} s")
    # overhead: the same estimate jobs (runs already there) one at a time, Ray's task taking both CPUs;
    # the fastest of three tries each, as the machine's other load comes and goes
    seconds = {"local": [], "ray": []}
    for trial in range(3):
        for executor in seconds:
            shutil.copytree(tmp_path / "local" / "runs", tmp_path / f"{executor}{trial}" / "runs")
            started = time.perf_counter()
            run_jobs(jobs, tmp_path / f"{executor}{trial}", executor=executor, progress=False, cpus_per_job=2)
            seconds[executor].append(time.perf_counter() - started)
    local_seconds, ray_seconds = min(seconds["local"]), min(seconds["ray"])
    print(f"{len(jobs)} estimate jobs, one at a time, fastest of 3: local {local_seconds:.2f} s, Ray {ray_seconds:.2f} s: "
          f"Ray's overhead {(ray_seconds - local_seconds) / len(jobs) * 1000:.0f} ms per job")
    assert not leftovers(tmp_path)


@needs_ray
def test_ray_retries_a_job_whose_worker_was_killed(ray_cluster, tmp_path):
    marker = tmp_path / "died"
    dying = EstimateJob("dies-once", functools.partial(model_that_dies_once, str(marker)), tiny_data,
                        SGLDConfig(chains=2, steps=20, batch_size=8))
    records = run_jobs([dying] + estimate_jobs(2), tmp_path / "out", executor="ray", progress=False)
    assert marker.exists() and [r["job"] for r in records] == ["dies-once", "net0", "net1"]
    print(f"\nRay worker killed (os._exit) by job dies-once, task retried: {len(records)} of 3 jobs finished")


@needs_ray
def test_ray_reports_a_failing_job_and_finishes_the_others(ray_cluster, tmp_path, capsys):
    bad = Job("psweep", TrainConfig(p=5, embed=4, hidden=16, batches=40, checkpoints=1, seed=7),
              SGLDConfig(chains=2, steps=20, burn_in=20, batch_size=8))
    with pytest.raises(JobsFailed, match="1 of 3 jobs failed"):
        run_jobs(tiny_jobs() + [bad], tmp_path, executor="ray", progress="log")
    failed = [line for line in capsys.readouterr().err.splitlines() if "failed" in line]
    assert failed == [f"job {bad.name} failed: burn-in must be in [0, steps) = [0, 20), got 20"]
    assert len(list((tmp_path / "jobs").glob("*.json"))) == 2
    print("\n" + failed[0])


@needs_ray
def test_a_cuda_job_on_a_cluster_without_gpus_is_refused_not_queued_forever(ray_cluster, tmp_path):
    if ray.cluster_resources().get("GPU"):
        pytest.skip("this machine's Ray instance has a GPU: the job would run")
    (job,) = estimate_jobs(1, device="cuda")
    with pytest.raises(FastLLCError, match="job net0 runs on CUDA, but the Ray cluster has no GPU"):
        run_jobs([job], tmp_path / "out", executor="ray", progress=False)
    assert not (tmp_path / "out" / "jobs").exists()


@needs_ray
def test_ray_driver_interrupted_and_resumed_redoes_only_jobs_in_flight(ray_cluster, tmp_path):
    jobs = tiny_jobs(seeds=(0, 1, 2, 3, 4, 5))
    seen = []

    def interrupt_after_two(name, outcome, detail):
        seen.append(name)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_jobs(jobs, tmp_path, executor="ray", progress=False, on_record=interrupt_after_two)
    written = {p.stem for p in (tmp_path / "jobs").glob("*.json")}
    assert written == set(seen) and not leftovers(tmp_path)
    redone = []
    records = run_jobs(jobs, tmp_path, executor="ray", progress=False, on_record=lambda name, *_: redone.append(name))
    assert set(redone) == {j.name for j in jobs} - written and len(records) == len(jobs)
    print(f"\ndriver interrupted after {len(written)} of {len(jobs)} jobs; the rerun ran the other {len(redone)} "
          "(submitted but unwritten at the interruption), none of the finished ones")
