"""``fastllc train``: train the study's MLP into a run directory."""

from __future__ import annotations

from pathlib import Path

import click

from .. import storage
from ..train import train
from .common import long_work, one_line_errors, progress, train_config, training_options


@click.command("train")
@training_options(("--train-seed", "--seed"))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run directory to create [default: ./runs/<task>-p<P>-...].")
@one_line_errors
def train_command(out, **options):
    """Train the study's MLP and write a run directory (config, checkpoints, metrics)."""
    config = train_config(**options, seed_option="--train-seed/--seed")
    out = out or Path("runs") / config.run_name()
    storage.check_writable_dir(out, "--out")
    with long_work(f"training {config.run_name()} ({config.batches} batches)", "trained"):
        run = train(config, out, progress=progress())
    final = run.metrics[-1]
    click.echo(f"run      {run.path}  ({len(run.steps)} checkpoints, steps 0..{run.steps[-1]})")
    click.echo(f"final    train loss {final['train_loss']:.4f} acc {final['train_acc']:.1%} | "
               f"test loss {final['test_loss']:.4f} acc {final['test_acc']:.1%}")
