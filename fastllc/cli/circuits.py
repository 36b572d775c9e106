"""``fastllc circuits``: the Fourier circuits of a modular-addition run."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import FastLLCError
from ..train import Run
from .common import check_plot_path, one_line_errors


@click.command("circuits")
@click.option("--run", "run_dir", type=click.Path(path_type=Path), required=True, help="A run directory.")
@click.option("--checkpoint", type=int, default=None, help="Checkpoint index [default: the final weights].")
@click.option("--along-training", is_flag=True, help="Count circuits at every checkpoint instead.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Save the per-frequency circles and the ablation curve to this image (.png, .pdf, .svg, ...).")
@one_line_errors
def circuits_command(run_dir, checkpoint, along_training, as_json, plot):
    """Fourier circuits of a modular-addition run: learned frequencies, circle plots, mode ablation."""
    from ..analysis import analyse_run, circuits_over_training

    if plot is not None:
        if along_training:
            raise FastLLCError("--plot draws one checkpoint and is not used with --along-training: drop one of them")
        check_plot_path(plot)  # before the analysis, so that a bad name costs nothing
    run = Run.load(run_dir)
    if along_training:
        reports = circuits_over_training(run)
        if as_json:
            click.echo(json.dumps([r.to_dict() for r in reports]))
            return
        click.echo(f"{'checkpoint':>10} {'step':>6} {'count':>5}  learned frequencies   test loss")
        for r in reports:
            click.echo(f"{r.checkpoint:>10} {r.step:>6} {r.count:>5}  {str(r.learned):<21} {r.full_test_loss:.4f}")
        return
    report, modes = analyse_run(run, checkpoint)
    if as_json:
        click.echo(json.dumps(report.to_dict()))
    else:
        _print_circuits(run, report)
    if plot is not None:  # after the table: a plot that fails to save loses nothing else
        from ..analysis.plots import plot_circuits

        try:
            plot_circuits(report, modes, plot, title=f"{run.path.name}, checkpoint {report.checkpoint} "
                          f"(step {report.step}): {report.count} circuit(s) {report.learned}")
        except OSError as err:
            raise FastLLCError(f"could not write the plot {plot}: {err.strerror or err}") from None
        if not as_json:
            click.echo(f"plot       {plot}")


def _print_circuits(run: Run, report) -> None:
    from ..analysis import CIRCUIT_RULE

    click.echo(f"run        {run.path}  checkpoint {report.checkpoint} (step {report.step})")
    click.echo(f"rule       {CIRCUIT_RULE}")
    click.echo(f"{'k':>4} {'magnitude':>9} {'roundness':>9} {'circularity':>11} {'loss keeping only k':>20}")
    for i, k in enumerate(report.frequencies):
        mark = "  ← learned" if k in report.learned else ""
        click.echo(f"{k:>4} {report.magnitudes[i]:>9.2f} {report.roundness[i]:>9.2f} {report.circularity[i]:>11.2f} "
                   f"{report.ablation_test_loss[i]:>20.3f}{mark}")
    click.echo(f"circuits   {report.count}: {report.learned}")
    kept = "" if report.learned_only_test_loss is None else f", keeping only the learned modes {report.learned_only_test_loss:.4f}"
    click.echo(f"test loss  full embedding {report.full_test_loss:.4f}{kept}")
    if report.clock_or_pizza:
        kinds = ", ".join(f"k={k}: {label} (2k/k power {ratio:.2f})" for k, (label, ratio) in report.clock_or_pizza.items())
        click.echo(f"kind       {kinds}   [experimental]")
    if report.note:
        click.echo(f"note       {report.note}")
