"""What the commands share: one-line errors, progress on a terminal or in a log, the training options,
the cached runs and the memory checks made before any work."""

from __future__ import annotations

import contextlib
import functools
import sys
import time
import warnings
from pathlib import Path

import click
from click.core import ParameterSource

from .. import resources, storage
from ..errors import FastLLCError
from ..sampling import SGLDConfig
from ..seeding import check_seed
from ..tasks import train_size
from ..train import Run, TrainConfig, cached_run


fastllc_home = storage.fastllc_home  # where cached runs live (the library's rule)


def progress() -> bool:
    return sys.stderr.isatty()


@contextlib.contextmanager
def long_work(start: str, done: str):
    """On a terminal tqdm's bars show progress; elsewhere (a log file, CI) one line on stderr when long
    work starts and one when it is done, so that a log tells waiting from hanging."""
    if progress():
        yield
        return
    click.echo(f"{start} ...", err=True)
    began = time.perf_counter()
    yield
    click.echo(f"{done} in {time.perf_counter() - began:.1f} s", err=True)


def one_line_errors(command):
    """Turn library errors into ``Error: <message>`` and exit code 1, never a traceback; print each
    RuntimeWarning raised on the way as a ``warning: <message>`` line when it happens (a sweep's warning
    about a damaged file is seen while the sweep runs, not after)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("always", RuntimeWarning)
            show_others = warnings.showwarning

            def show(message, category, *rest, **options):
                if issubclass(category, RuntimeWarning):
                    click.echo(f"warning: {message}", err=True)
                else:
                    show_others(message, category, *rest, **options)

            warnings.showwarning = show  # restored by catch_warnings
            try:
                return command(*args, **kwargs)
            except FastLLCError as err:
                raise click.ClickException(str(err)) from None

    return wrapper


def check_plot_path(plot: Path) -> None:
    """The plot's file type (its suffix) must be one matplotlib writes, and its place writable."""
    from matplotlib.figure import Figure

    kinds = sorted(Figure().canvas.get_supported_filetypes())
    if plot.suffix[1:].lower() not in kinds:
        raise FastLLCError(f"--plot {plot}: matplotlib cannot write {plot.suffix or 'a name without a suffix'}; "
                           f"end the name with one of {', '.join('.' + k for k in kinds)}")
    storage.check_writable_file(plot, "--plot")


def training_options(train_seed_names=("--train-seed",)):
    """The options that define a training run; ``train_seed_names``: the seed option's names (``train``
    also takes ``--seed``; ``estimate`` has its own ``--seed``, the SGLD seed)."""

    def decorate(command):
        options = [
            click.option("--p", "p", type=int, default=None, help="Modulus: the task lives on Z_p."),
            click.option("--task", type=click.Choice(["add", "random"]), default="add", show_default=True,
                         help="Modular addition, or a random commutative operation (memorisation)."),
            click.option("--embed", type=int, default=8, show_default=True, help="Embedding width e."),
            click.option("--hidden", type=int, default=32, show_default=True, help="Hidden width h."),
            click.option("--batches", type=int, default=None,
                         help="Training batches of 64 [default: 10000; 15000 for p >= 41 (the study's p-sweep: 15000 at p = 41 and 53 only)]."),
            click.option("--checkpoints", type=int, default=25, show_default=True,
                         help="Evenly spaced checkpoints (0 = initialisation), plus the final weights."),
            click.option(*train_seed_names, "train_seed", type=int, default=0, show_default=True,
                         help="Seed of the task table, split, initialisation and batches."),
            click.option("--init-scale", type=float, default=1.0, show_default=True,
                         help="Multiply the embedding and both first-layer weights at initialisation (the study's "
                              "architectures figure: 0.5)."),
            click.option("--split", type=click.Choice(["per-seed", "fixed"]), default="per-seed", show_default=True,
                         help="per-seed: the seed keys the task table and split; fixed: seed 0's table and split for "
                              "every seed (runs differ by initialisation and batches, as in the study's p-sweep)."),
            click.option("--portable", is_flag=True,
                         help="Train with PyTorch's non-vector kernels in a child process: the same network on any "
                              "x86-64 CPU (about 1.2x the training time; a run of its own, named -portable)."),
        ]
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


TRAINING_OPTIONS = ("p", "task", "embed", "hidden", "batches", "checkpoints", "train_seed", "init_scale", "split",
                    "portable")


def train_config(p, task, embed, hidden, batches, checkpoints, train_seed, init_scale=1.0, split="per-seed",
                 portable=False, seed_option="--train-seed") -> TrainConfig:
    if p is None:
        raise FastLLCError("give the modulus --p (or, for `estimate`, an existing --run)")
    check_seed(train_seed, seed_option)
    return TrainConfig(p=p, task=task, embed=embed, hidden=hidden, batches=batches, checkpoints=checkpoints,
                       seed=train_seed, init_scale=init_scale, split=split, portable=portable).validate()


def refuse_training_options_with_run() -> None:
    """With --run the run's own config fixes the model and its training: a training option given as
    well would be silently ignored, so it is refused."""
    ctx = click.get_current_context()
    for param in ctx.command.params:
        if param.name in TRAINING_OPTIONS and ctx.get_parameter_source(param.name) in (
                ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT):
            raise FastLLCError(f"{param.opts[0]} is ignored with --run (the run fixes the model and its training): "
                               "drop it")


def require_run_sampling_memory(training: TrainConfig, sgld: SGLDConfig, device) -> None:
    """Refuse, before any work, sampling ``training``'s network with ``sgld`` that cannot fit: the library's
    check (``resources.require_sampling_memory``, the formula ``api.estimate`` uses) in the commands' words."""
    p, e, h, C, T = training.p, training.embed, training.hidden, sgld.chains, sgld.steps
    n = train_size(p, training.train_frac)
    resources.require_sampling_memory(
        C, T, resources.mlp_parameters(p, e, h), resources.mlp_minibatch_bytes(p, e, h, sgld.batch_size), device,
        start_bytes=resources.mlp_start_bytes(p, e, h, n), subject=f"a run of {C:,} chains × {T:,} steps",
        start=(f"p = {p}", f"sampling (the loss and gradient at w* over all {n:,} training pairs)",
               "use a smaller --p"),
        names=("--batch-size", "--chains or --steps"))


def cache_path(config: TrainConfig) -> Path:
    return fastllc_home() / "runs" / config.run_name()


def cached_run_with_notices(config: TrainConfig) -> Run:
    """``train.cached_run`` under ``$FASTLLC_HOME`` (the run for ``config`` from the cache, trained there once
    if it is not there; safe when several processes ask at once), telling the user on stderr: a line when
    training starts and, without a terminal (whose progress bar shows it), one when it ends."""
    started = []

    def notice(line: str) -> None:
        started.append(time.perf_counter())
        click.echo(line, err=True)

    run = cached_run(config, fastllc_home(), progress=progress(), notice=notice)
    if started and not progress():
        click.echo(f"trained in {time.perf_counter() - started[0]:.1f} s", err=True)
    return run
