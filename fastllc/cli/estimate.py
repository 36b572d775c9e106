"""``fastllc estimate``: λ̂ at one checkpoint of a run (trained once and cached when only --p is given)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .. import api, resources, storage
from ..backends import CHOICES as BACKEND_CHOICES, resolve_backend
from ..errors import FastLLCError
from ..sampling import SGLDConfig, resolve_device
from ..train import Run
from .common import (cache_path, cached_run, long_work, one_line_errors, progress, refuse_training_options_with_run,
                     require_sampling_memory, train_config, training_options)


@click.command("estimate")
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
@click.option("--chain-loss", type=click.Choice(["exact", "published"]), default="exact", show_default=True,
              help="The chains' loss: exact cross-entropy, or the published study's −log(p_y + 1e-6).")
@click.option("--backend", default="auto", show_default=True, help=f"One of {', '.join(BACKEND_CHOICES)}.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, or auto (cuda when available).")
@click.option("--run", "run_dir", type=click.Path(path_type=Path), default=None,
              help="A run directory from `fastllc train` [default: train (once, cached) for --p].")
@click.option("--checkpoint", type=int, default=None, help="Checkpoint index [default: the final weights].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the SGLD noise and minibatches.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a summary.")
@one_line_errors
def estimate_command(chains, steps, burn_in, epsilon, gamma, nbeta, batch_size, orthogonal, sampler, rmsprop_alpha,
                     rmsprop_eps, chain_loss, backend, device, run_dir, checkpoint, seed, as_json, **training):
    """Estimate λ̂ at a checkpoint with SGLD chains started at its weights."""
    if run_dir is not None:
        refuse_training_options_with_run()
    config = SGLDConfig(chains=chains, steps=steps, burn_in=burn_in, epsilon=epsilon, gamma=gamma, nbeta=nbeta,
                        batch_size=batch_size, orthogonal=orthogonal, seed=seed, sampler=sampler,
                        rmsprop_alpha=rmsprop_alpha, rmsprop_eps=rmsprop_eps, chain_loss=chain_loss).validate()
    device = resolve_device(device)
    name = resolve_backend(backend, device, needs=config.needs())  # fail before any training
    if run_dir is not None:
        run = Run.load(run_dir)
        require_sampling_memory(run.config, config, device)
    else:
        training_config = train_config(**training)
        if not cache_path(training_config).exists():
            storage.check_writable_dir(cache_path(training_config), "the run cache (FASTLLC_HOME)")
            resources.require_training_memory(training_config.p, training_config.embed, training_config.hidden)
        require_sampling_memory(training_config, config, device)
        run = cached_run(training_config)
    index = run.checkpoint_index(checkpoint)
    with long_work(f"sampling {config.chains} chains × {config.steps} steps ({name} on {device})", "sampled"):
        result = api.estimate_run(run, index, config, backend=backend, device=device, progress=progress())
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
