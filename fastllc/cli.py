"""The ``fastllc`` command line: parse options, call the public API, print. No logic lives only here."""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import time
import warnings
from pathlib import Path

import click
from click.core import ParameterSource

from . import api, resources, storage
from .errors import FastLLCError
from .backends import CHOICES as BACKEND_CHOICES, resolve_backend
from .sampling import SGLDConfig, resolve_device
from .seeding import check_seed
from .tasks import train_size
from .train import Run, TrainConfig, default_batches, train
from .train import cached_run as load_or_train


fastllc_home = storage.fastllc_home  # where cached runs live (the library's rule)


def _progress() -> bool:
    return sys.stderr.isatty()


@contextlib.contextmanager
def _long_work(start: str, done: str):
    """On a terminal tqdm's bars show progress; elsewhere (a log file, CI) one line on stderr when long
    work starts and one when it is done, so that a log tells waiting from hanging."""
    if _progress():
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


def _check_plot_path(plot: Path) -> None:
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
                         help="Training batches of 64 [default: 10000; 15000 for p >= 41, as published]."),
            click.option("--checkpoints", type=int, default=25, show_default=True,
                         help="Evenly spaced checkpoints (0 = initialisation), plus the final weights."),
            click.option(*train_seed_names, "train_seed", type=int, default=0, show_default=True,
                         help="Seed of the task table, split, initialisation and batches."),
        ]
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


TRAINING_OPTIONS = ("p", "task", "embed", "hidden", "batches", "checkpoints", "train_seed")


def _train_config(p, task, embed, hidden, batches, checkpoints, train_seed, seed_option="--train-seed") -> TrainConfig:
    if p is None:
        raise FastLLCError("give the modulus --p (or, for `estimate`, an existing --run)")
    check_seed(train_seed, seed_option)
    batches = default_batches(p) if batches is None else batches
    return TrainConfig(p=p, task=task, embed=embed, hidden=hidden, batches=batches, checkpoints=checkpoints,
                       seed=train_seed).validate()


def _refuse_training_options_with_run() -> None:
    """With --run the run's own config fixes the model and its training: a training option given as
    well would be silently ignored, so it is refused."""
    ctx = click.get_current_context()
    for param in ctx.command.params:
        if param.name in TRAINING_OPTIONS and ctx.get_parameter_source(param.name) in (
                ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT):
            raise FastLLCError(f"{param.opts[0]} is ignored with --run (the run fixes the model and its training): "
                               "drop it")


def _require_sampling_memory(training: TrainConfig, sgld: SGLDConfig, device) -> None:
    """The host's share of sampling (api.estimate checks the device's share itself)."""
    n, C, T = train_size(training.p, training.train_frac), sgld.chains, sgld.steps
    start, chains = resources.mlp_sampling_bytes(training.p, training.embed, training.hidden, n, C, T, sgld.batch_size)
    if device.type != "cpu":
        chains = resources.chains_bytes(C, T, 0)  # only the loss traces come back to the host
    if start > chains:
        resources.require_memory(start + chains, f"p = {training.p}",
                                 f"sampling (the loss and gradient at w* over all {n:,} training pairs)",
                                 "use a smaller --p")
    else:
        resources.require_memory(start + chains, f"a run of {C:,} chains × {T:,} steps",
                                 "sampling (every chain's weights, gradients and loss trace)",
                                 "use fewer --chains or --steps")


@click.group()
@click.version_option(package_name="fastllc")
def main():
    """fastllc: fast estimates of the local learning coefficient λ̂ with batched SGLD."""


@main.command("train")
@training_options(("--train-seed", "--seed"))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run directory to create [default: ./runs/<task>-p<P>-...].")
@one_line_errors
def train_command(out, **options):
    """Train the study's MLP and write a run directory (config, checkpoints, metrics)."""
    config = _train_config(**options, seed_option="--train-seed/--seed")
    out = out or Path("runs") / config.run_name()
    storage.check_writable_dir(out, "--out")
    with _long_work(f"training {config.run_name()} ({config.batches} batches)", "trained"):
        run = train(config, out, progress=_progress())
    final = run.metrics[-1]
    click.echo(f"run      {run.path}  ({len(run.steps)} checkpoints, steps 0..{run.steps[-1]})")
    click.echo(f"final    train loss {final['train_loss']:.4f} acc {final['train_acc']:.1%} | "
               f"test loss {final['test_loss']:.4f} acc {final['test_acc']:.1%}")


def _cache_path(config: TrainConfig) -> Path:
    return fastllc_home() / "runs" / config.run_name()


def cached_run(config: TrainConfig) -> Run:
    """The run for ``config`` from the cache, training it once if it is not there (safe when several
    processes ask at once: ``train.cached_run``); without a terminal, a line when training ends."""
    started = []

    def notice(line: str) -> None:
        started.append(time.perf_counter())
        click.echo(line, err=True)

    run = load_or_train(config, fastllc_home(), progress=_progress(), notice=notice)
    if started and not _progress():
        click.echo(f"trained in {time.perf_counter() - started[0]:.1f} s", err=True)
    return run


@main.command("estimate")
@training_options()
@click.option("--chains", type=int, default=4, show_default=True, help="SGLD chains, run together.")
@click.option("--steps", type=int, default=5000, show_default=True, help="SGLD steps per chain.")
@click.option("--burn-in", type=int, default=0, show_default=True, help="Steps dropped from the average.")
@click.option("--epsilon", type=float, default=1e-3, show_default=True, help="Step size ε.")
@click.option("--gamma", type=float, default=5.0, show_default=True, help="Localisation strength γ.")
@click.option("--nbeta", type=float, default=None, help="Inverse temperature nβ [default: n/log n].")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Minibatch size m.")
@click.option("--orthogonal/--no-orthogonal", default=False, show_default=True,
              help="Restrict SGLD orthogonally to the full-batch gradient at w*.")
@click.option("--sampler", type=click.Choice(["sgld", "rmsprop_sgld"]), default="sgld", show_default=True,
              help="Plain SGLD, or RMSProp-preconditioned SGLD (devinterp's rmsprop_sgld; backend generic or reference).")
@click.option("--rmsprop-alpha", type=float, default=0.99, show_default=True, help="RMSProp's decay α.")
@click.option("--rmsprop-eps", type=float, default=0.1, show_default=True, help="RMSProp's stabiliser δ in 1/(√V + δ).")
@click.option("--backend", default="auto", show_default=True, help=f"One of {', '.join(BACKEND_CHOICES)}.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, or auto (cuda when available).")
@click.option("--run", "run_dir", type=click.Path(path_type=Path), default=None,
              help="A run directory from `fastllc train` [default: train (once, cached) for --p].")
@click.option("--checkpoint", type=int, default=None, help="Checkpoint index [default: the final weights].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the SGLD noise and minibatches.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a summary.")
@one_line_errors
def estimate_command(chains, steps, burn_in, epsilon, gamma, nbeta, batch_size, orthogonal, sampler, rmsprop_alpha,
                     rmsprop_eps, backend, device, run_dir, checkpoint, seed, as_json, **training):
    """Estimate λ̂ at a checkpoint with SGLD chains started at its weights."""
    if run_dir is not None:
        _refuse_training_options_with_run()
    config = SGLDConfig(chains=chains, steps=steps, burn_in=burn_in, epsilon=epsilon, gamma=gamma, nbeta=nbeta,
                        batch_size=batch_size, orthogonal=orthogonal, seed=seed, sampler=sampler,
                        rmsprop_alpha=rmsprop_alpha, rmsprop_eps=rmsprop_eps).validate()
    device = resolve_device(device)
    name = resolve_backend(backend, device, needs=config.needs())  # fail before any training
    if run_dir is not None:
        run = Run.load(run_dir)
        _require_sampling_memory(run.config, config, device)
    else:
        training_config = _train_config(**training)
        if not _cache_path(training_config).exists():
            storage.check_writable_dir(_cache_path(training_config), "the run cache (FASTLLC_HOME)")
            resources.require_training_memory(training_config.p, training_config.embed, training_config.hidden)
        _require_sampling_memory(training_config, config, device)
        run = cached_run(training_config)
    index = run.checkpoint_index(checkpoint)
    with _long_work(f"sampling {config.chains} chains × {config.steps} steps ({name} on {device})", "sampled"):
        result = api.estimate_run(run, index, config, backend=backend, device=device, progress=_progress())
    metrics = run.metrics[index]
    if as_json:
        record = dict(result.to_dict(), run=str(run.path), checkpoint=index, step=run.steps[index],
                      p=run.config.p, task=run.config.task, embed=run.config.embed, hidden=run.config.hidden,
                      train_loss=metrics["train_loss"], test_loss=metrics["test_loss"])
        click.echo(json.dumps(record))
    else:
        click.echo(f"run       {run.path}  checkpoint {index} (step {run.steps[index]})")
        click.echo(f"model     train loss {metrics['train_loss']:.4f} acc {metrics['train_acc']:.1%} | "
                   f"test loss {metrics['test_loss']:.4f} acc {metrics['test_acc']:.1%}")
        click.echo(f"λ̂         {result.llc_mean:.1f} ± {result.llc_se:.1f} (standard error)   "
                   f"std across chains {result.llc_std:.1f}   healthy {result.healthy_chains}/{result.chains} chains")
        click.echo(f"sampling  {result.chains} chains × {result.steps} steps, {result.backend} on {result.device}: "
                   f"{result.sampling_seconds:.1f} s, {result.chain_steps_per_second:,.0f} chain-steps/s, "
                   f"split-R̂ {result.r_hat:.3f}, ESS {result.ess:.0f}")
    if result.healthy_chains == 0:
        raise FastLLCError("every chain diverged (non-finite or exploding loss); try a smaller --epsilon")


@main.command("circuits")
@click.option("--run", "run_dir", type=click.Path(path_type=Path), required=True, help="A run directory.")
@click.option("--checkpoint", type=int, default=None, help="Checkpoint index [default: the final weights].")
@click.option("--along-training", is_flag=True, help="Count circuits at every checkpoint instead.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Save the per-frequency circles and the ablation curve to this image (.png, .pdf, .svg, ...).")
@one_line_errors
def circuits_command(run_dir, checkpoint, along_training, as_json, plot):
    """Fourier circuits of a modular-addition run: learned frequencies, circle plots, mode ablation."""
    from .analysis import analyse_run, circuits_over_training

    if plot is not None:
        if along_training:
            raise FastLLCError("--plot draws one checkpoint and is not used with --along-training: drop one of them")
        _check_plot_path(plot)  # before the analysis, so that a bad name costs nothing
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
        from .analysis.plots import plot_circuits

        try:
            plot_circuits(report, modes, plot, title=f"{run.path.name}, checkpoint {report.checkpoint} "
                          f"(step {report.step}): {report.count} circuit(s) {report.learned}")
        except OSError as err:
            raise FastLLCError(f"could not write the plot {plot}: {err.strerror or err}") from None
        if not as_json:
            click.echo(f"plot       {plot}")


def _print_circuits(run: Run, report) -> None:
    from .analysis import CIRCUIT_RULE

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


@main.command("reproduce")
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
    from .experiments import SWEEPS, run_sweep, write_report

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


@main.command("report")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@one_line_errors
def report_command(out):
    """Rebuild a sweep directory's tables and plots from its job JSONs."""
    from .experiments import write_report

    click.echo(write_report(out).read_text())


if __name__ == "__main__":
    main()
