"""``fastllc sweep SPEC``: a sweep of your own, from a spec file, on this machine or a Ray cluster."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .common import one_line_errors


def executor_options(command):
    """--executor, --workers, --address: where a sweep's jobs run (shared by every sweep command)."""
    options = [
        click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                     help="local: this machine (in process, or --workers processes); ray: one Ray task per job."),
        click.option("--workers", type=click.IntRange(min=1), default=None,
                     help="local: run jobs in N processes [default: in this process]; ray without --address: "
                          "the local Ray instance's CPUs [default: all]."),
        click.option("--address", default=None,
                     help="Ray cluster to join (host:port, or auto for the one `ray start` runs here) "
                          "[default: $RAY_ADDRESS, else a local Ray instance for this sweep]."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@click.command("sweep")
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Sweep directory: jobs/<job>.json, runs/, report.md. Rerunning skips finished jobs.")
@executor_options
@click.option("--json", "as_json", is_flag=True, help="No progress bar; print the job records as JSON.")
@one_line_errors
def sweep_command(spec, out, executor, workers, address, as_json):
    """Run the sweep of a spec file (TOML: task, p, seeds, architecture, training, SGLD settings), resumable,
    then write its report (also `fastllc report OUT`)."""
    from ..experiments import write_report
    from ..experiments.executors import JobsFailed, run_jobs
    from ..experiments.spec import load_spec

    jobs = load_spec(spec)
    try:
        records = run_jobs(jobs, out, executor=executor, workers=workers, address=address,
                           progress=False if as_json else "auto")
    except JobsFailed as failed:
        if as_json:
            click.echo(json.dumps(dict(out=str(out), records=failed.records, failed=failed.failures), indent=1))
        raise
    if as_json:
        click.echo(json.dumps(dict(out=str(out), records=records, failed={}), indent=1))
        return
    report = write_report(out)
    click.echo(f"{len(records)} jobs in {out}; report: {report}")
    click.echo(report.read_text())
