"""``fastllc reproduce`` and ``fastllc report``: the published study's sweeps and their reports."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import FastLLCError
from .common import one_line_errors


@click.command("reproduce")
@click.argument("sweep", type=click.Choice(["psweep", "architectures", "memorization", "dynamics", "circuits", "calibrate"]))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Sweep directory [default: ./sweeps/<sweep>; circuits shares ./sweeps/psweep]; rerunning skips finished jobs.")
@click.option("--chains", type=int, default=None, help="Chains per estimate [default: 64; 16 for dynamics; 8 per cell for calibrate].")
@click.option("--seeds", type=int, default=None, help="Training seeds per point [default: the study's].")
@click.option("--quick", is_flag=True, help="Small primes and short runs: the qualitative claims in minutes.")
@click.option("--p", "moduli", type=int, multiple=True,
              help="Only these moduli of the sweep (repeatable, e.g. --p 20 --p 25) [default: all].")
@one_line_errors
def reproduce_command(sweep, out, chains, seeds, quick, moduli):
    """Run one of the published study's sweeps (resumable), then write its report."""
    from ..experiments import SWEEPS, run_sweep, write_report

    options = {k: v for k, v in dict(chains=chains, seeds=seeds).items() if v is not None}
    for name, value in options.items():
        if value < 1:
            raise FastLLCError(f"{name} must be at least 1, got {value}")
    out = out or Path("sweeps") / (("psweep" if sweep == "circuits" else sweep) + ("-quick" if quick else ""))
    jobs = SWEEPS[sweep](quick=quick, **options)
    if moduli:
        unknown = sorted(set(moduli) - {job.training.p for job in jobs})
        if unknown:
            raise FastLLCError(f"the {sweep} sweep has no p = {unknown[0]}; "
                               f"its moduli are {sorted({job.training.p for job in jobs})}")
        jobs = [job for job in jobs if job.training.p in moduli]
    records = run_sweep(jobs, out, progress="auto")
    report = write_report(out)
    click.echo(f"{len(records)} jobs in {out}; report: {report}")
    click.echo(report.read_text())


@click.command("report")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@one_line_errors
def report_command(out):
    """Rebuild a sweep directory's tables and plots from its job JSONs."""
    from ..experiments import write_report

    click.echo(write_report(out).read_text())
