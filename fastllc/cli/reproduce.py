"""``fastllc reproduce`` and ``fastllc report``: the published study's sweeps and their reports."""

from __future__ import annotations

from pathlib import Path

import click

from ..backends import CHOICES as BACKEND_CHOICES
from ..backends import resolve_backend
from ..errors import FastLLCError
from ..sampling import resolve_device
from .common import one_line_errors
from .sweep import executor_options


@click.command("reproduce")
@click.argument("sweep", type=click.Choice(["psweep", "architectures", "memorization", "dynamics", "circuits", "calibrate"]))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Sweep directory [default: ./sweeps/<sweep>; circuits shares ./sweeps/psweep]; rerunning skips finished jobs.")
@click.option("--chains", type=int, default=None, help="Chains per estimate [default: 64; 16 for dynamics; 8 per cell for calibrate].")
@click.option("--seeds", type=int, default=None,
              help="Training seeds per point [default: the study's: psweep 5 (10 at p = 53), memorization 3, others 1-2].")
@click.option("--quick", is_flag=True, help="Small primes and short runs: the qualitative claims in minutes.")
@click.option("--p", "moduli", type=int, multiple=True,
              help="Only these moduli of the sweep (repeatable, e.g. --p 20 --p 25) [default: all].")
@click.option("--variant", "variants", multiple=True,
              help="Only these settings variants (repeatable): psweep published|today, architectures published|today, "
                   "memorization published|exact|published-orth|exact-orth [default: the sweep's; see the README].")
@click.option("--split", type=click.Choice(["fixed", "per-seed"]), default=None,
              help="fixed: the seeds of a p share one train split (seed 0's), as the study did; per-seed: a split per "
                   "seed [default: the variant's: fixed for the published p-sweep, per-seed elsewhere].")
@click.option("--chain-loss", type=click.Choice(["published", "exact", "both"]), default=None,
              help="The SGLD chain loss: the study's −log(p_y + 1e-6), exact cross-entropy, or both side by side "
                   "[default: the variant's].")
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True,
              help="Sampling backend (recorded in every job JSON); auto picks the fastest that has what a job needs.")
@executor_options
@one_line_errors
def reproduce_command(sweep, out, chains, seeds, quick, moduli, variants, split, chain_loss, backend, executor, workers,
                      address):
    """Run one of the published study's sweeps (resumable), then write its report."""
    from ..experiments import SWEEPS, run_jobs, write_report
    from ..experiments.sweeps import VARIANTS

    options = {k: v for k, v in dict(chains=chains, seeds=seeds).items() if v is not None}
    for name, value in options.items():
        if value < 1:
            raise FastLLCError(f"--{name} must be at least 1, got {value}")
    if variants and ("psweep" if sweep == "circuits" else sweep) not in VARIANTS:
        raise FastLLCError(f"--variant: the {sweep} sweep has no settings variants; drop --variant")
    out = out or Path("sweeps") / (("psweep" if sweep == "circuits" else sweep) + ("-quick" if quick else ""))
    jobs = SWEEPS[sweep](quick=quick, split=split, chain_loss=chain_loss, variants=variants, backend=backend, **options)
    if moduli:
        unknown = sorted(set(moduli) - {job.training.p for job in jobs})
        if unknown:
            raise FastLLCError(f"the {sweep} sweep has no p = {unknown[0]}; "
                               f"its moduli are {sorted({job.training.p for job in jobs})}")
        jobs = [job for job in jobs if job.training.p in moduli]
    require_backend(jobs, backend)
    # the one sweep driver, as `fastllc sweep` runs: a failed job is reported and the others go on (JobsFailed)
    records = run_jobs(jobs, out, executor=executor, workers=workers, address=address, progress="auto")
    report = write_report(out)
    click.echo(f"{len(records)} jobs in {out}; report: {report}")
    click.echo(report.read_text())


def require_backend(jobs: list, backend: str) -> None:
    """Refuse before any training a backend (or auto, when none can) without what a job needs."""
    for needs in {job.sgld.needs() + (("stacked_starts",) if job.kind == "dynamics" else ()) for job in jobs}:
        try:
            resolve_backend(backend, resolve_device("cpu"), needs=needs)
        except FastLLCError as err:
            hint = "; --chain-loss exact runs it with the exact chain loss" if "published_chain_loss" in needs else ""
            raise FastLLCError(f"{err}{hint}") from None


@click.command("report")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@one_line_errors
def report_command(out):
    """Rebuild a sweep directory's tables and plots from its job JSONs."""
    from ..experiments import write_report

    click.echo(write_report(out).read_text())
