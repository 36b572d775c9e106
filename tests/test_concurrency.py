"""Several processes training the same run or running the same sweep at once: all succeed, one copy stays."""

import json
import os
import subprocess
import sys
import textwrap
import time

TRAIN = """
    import hashlib
    from fastllc.train import TrainConfig, cached_run
    config = TrainConfig(p=5, embed=4, hidden=8, batches=30, checkpoints=2)
    trained = []
    run = cached_run(config, ROOT, notice=trained.append)
    weights = b"".join(t.numpy().tobytes() for t in run.load_model().state_dict().values())
    print(json.dumps(dict(path=str(run.path), weights=hashlib.sha256(weights).hexdigest(), trained=bool(trained))))
"""

SWEEP = """
    from fastllc import SGLDConfig, TrainConfig
    from fastllc.experiments import Job, run_sweep
    sgld = SGLDConfig(chains=2, steps=20)
    # random operations: no circuit analysis, so each process only trains and samples
    jobs = [Job("memorization", TrainConfig(p=p, task="random", embed=4, hidden=8, batches=30, checkpoints=1, seed=s), sgld)
            for p in (5, 7) for s in (0, 1)]
    print(json.dumps(run_sweep(jobs, ROOT, progress=False)))
"""


def start_together(body: str, root, count: int) -> list[dict]:
    """Start ``count`` processes that run ``body`` at one signal (after their imports); their JSON outputs."""
    go = root.parent / f"go-{root.name}"
    script = "import json, pathlib, sys, time\nROOT = pathlib.Path(sys.argv[1])\n" \
             "while not pathlib.Path(sys.argv[2]).exists():\n    time.sleep(0.002)\n" + textwrap.dedent(body)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), *sys.path]), OMP_NUM_THREADS="1")
    processes = [subprocess.Popen([sys.executable, "-c", script, str(root), str(go)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env) for _ in range(count)]
    time.sleep(0.5)
    go.touch()
    outputs = [p.communicate(timeout=300) for p in processes]
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0 and "Traceback" not in err, err
    return [json.loads(out.splitlines()[-1]) for out, _ in outputs]


def hidden(folder):
    return [p for p in folder.rglob(".*")]


def test_processes_training_one_run_all_get_it(tmp_path):
    results = start_together(TRAIN, tmp_path / "home", 3)
    assert len({r["path"] for r in results}) == 1 and len({r["weights"] for r in results}) == 1
    assert any(r["trained"] for r in results)
    assert len(list((tmp_path / "home" / "runs").iterdir())) == 1 and hidden(tmp_path / "home") == []


def test_two_sweeps_into_one_directory_both_complete(tmp_path):
    first, second = start_together(SWEEP, tmp_path / "sweep", 2)
    assert len(first) == 4 and first == second  # the first complete record of each job wins, for both
    assert len(list((tmp_path / "sweep" / "jobs").glob("*.json"))) == 4
    assert len(list((tmp_path / "sweep" / "runs").iterdir())) == 4 and hidden(tmp_path / "sweep") == []
