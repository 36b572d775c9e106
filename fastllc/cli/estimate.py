"""``fastllc estimate``: λ̂ at one checkpoint of a run (trained once and cached when only --p is given)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import click

from .. import api, resources, storage
from ..backends import CHOICES as BACKEND_CHOICES, resolve_backend
from ..errors import FastLLCError
from ..model import param_shapes
from ..llc import divergence_advice
from ..sampling import SGLDConfig, resolve_device, samplers, wbic_nbeta
from ..train import Run
from .common import (cache_path, cached_run_with_notices, long_work, one_line_errors, progress,
                     refuse_training_options_with_run, require_run_sampling_memory, train_config, training_options)

TENSORS = len(param_shapes(2, 1, 1))  # the study's MLP's parameter tensors, whatever its size: one group each


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
@click.option("--sampler", type=click.Choice(samplers.by_name()), default="sgld", show_default=True,
              help="Plain SGLD, or RMSProp-preconditioned SGLD (devinterp's rmsprop_sgld; backends torch, generic and reference).")
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
@click.option("--per-parameter", is_flag=True,
              help="λ̂ of each parameter tensor (embedding, both first-layer maps and biases, unembedding) with the "
                   "others fixed at w*: --chains chains per tensor, all in one batched run; prints a table.")
@click.option("--control-variate", is_flag=True,
              help="Read the chains with the minibatch control variate: λ̂ = nβ·mean[L_B(w_t) − L_B(w*)], the same "
                   "mean with less noise (not with --per-parameter).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a summary.")
@one_line_errors
def estimate_command(chains, steps, burn_in, epsilon, gamma, nbeta, batch_size, orthogonal, sampler, rmsprop_alpha,
                     rmsprop_eps, chain_loss, backend, device, run_dir, checkpoint, seed, per_parameter, control_variate, as_json,
                     **training):
    """Estimate λ̂ at a checkpoint with SGLD chains started at its weights."""
    if run_dir is not None:
        refuse_training_options_with_run()
    if control_variate and per_parameter:
        raise FastLLCError("--control-variate reads one estimate's chains; it is not available with --per-parameter")
    training_config = None if run_dir is not None else train_config(**training)  # checked before the backend loads
    config = SGLDConfig(chains=chains, steps=steps, burn_in=burn_in, epsilon=epsilon, gamma=gamma, nbeta=nbeta,
                        batch_size=batch_size, orthogonal=orthogonal, seed=seed, sampler=sampler,
                        rmsprop_alpha=rmsprop_alpha, rmsprop_eps=rmsprop_eps, chain_loss=chain_loss).validate()
    device = resolve_device(device)
    needs = config.needs() + (("restrict",) if per_parameter else ())
    name = resolve_backend(backend, device, needs=needs)  # fail before any training
    batch = replace(config, chains=config.chains * TENSORS) if per_parameter else config
    if run_dir is not None:
        run = Run.load(run_dir)
        require_run_sampling_memory(run.config, batch, device)
    else:
        if not cache_path(training_config).exists():
            storage.check_writable_dir(cache_path(training_config), "the run cache (FASTLLC_HOME)")
            resources.require_training_memory(training_config.p, training_config.embed, training_config.hidden)
        require_run_sampling_memory(training_config, batch, device)
        run = cached_run_with_notices(training_config)
    index = run.checkpoint_index(checkpoint)
    if per_parameter:
        return _per_parameter(run, index, config, backend, name, device, as_json)
    with long_work(f"sampling {config.chains} chains × {config.steps} steps ({name} on {device})", "sampled"):
        result = api.estimate_run(run, index, config, backend=backend, device=device, progress=progress(),
                                  control_variate=control_variate)
    metrics = run.metrics[index]
    if as_json:
        click.echo(json.dumps(dict(result.to_dict(), **_run_record(run, index))))
    else:
        click.echo(f"run       {run.path}  checkpoint {index} (step {run.steps[index]})")
        click.echo(f"model     train loss {metrics['train_loss']:.4f} acc {metrics['train_acc']:.1%} | "
                   f"test loss {metrics['test_loss']:.4f} acc {metrics['test_acc']:.1%}")
        click.echo(f"λ̂         {result.llc_mean:.1f} ± {result.llc_se:.1f} (standard error"
                   f"{', minibatch control variate' if result.control_variate else ''})   "
                   f"std across chains {result.llc_std:.1f}   healthy {result.healthy_chains}/{result.chains} chains")
        click.echo(f"sampling  {result.chains} chains × {result.steps} steps, {result.backend} on {result.device}: "
                   f"{result.sampling_seconds:.1f} s, {result.chain_steps_per_second:,.0f} chain-steps/s, "
                   f"split-R̂ {result.r_hat:.3f}, ESS {result.ess:.0f}")
    if result.healthy_chains == 0:
        advice = divergence_advice(config.epsilon, config.nbeta, wbic_nbeta(run.config.make_task().n_train))
        raise FastLLCError(f"every chain diverged (non-finite or exploding loss); {advice}")


def _run_record(run: Run, index: int) -> dict:
    """What a JSON answer says about the run and checkpoint it sampled."""
    metrics = run.metrics[index]
    return dict(run=str(run.path), checkpoint=index, step=run.steps[index], p=run.config.p, task=run.config.task,
                embed=run.config.embed, hidden=run.config.hidden, train_loss=metrics["train_loss"],
                test_loss=metrics["test_loss"])


def _per_parameter(run: Run, index: int, config: SGLDConfig, backend: str, name: str, device, as_json: bool) -> None:
    """--per-parameter: one group per parameter tensor, one batched run, a table (or one JSON object)."""
    groups = TENSORS
    with long_work(f"sampling {groups} parameter tensors × {config.chains} chains × {config.steps} steps "
                   f"({name} on {device})", "sampled"):
        results = api.estimate_run_groups(run, index, config, groups="per-parameter", backend=backend, device=device,
                                          progress=progress())
    first = next(iter(results.values()))
    if as_json:
        click.echo(json.dumps(dict(_run_record(run, index), groups=results.to_dict())))
    else:
        metrics = run.metrics[index]
        click.echo(f"run       {run.path}  checkpoint {index} (step {run.steps[index]})")
        click.echo(f"model     train loss {metrics['train_loss']:.4f} acc {metrics['train_acc']:.1%} | "
                   f"test loss {metrics['test_loss']:.4f} acc {metrics['test_acc']:.1%}")
        click.echo(results.table())
        click.echo(f"sampling  {groups} groups × {config.chains} chains = {groups * config.chains} chains × "
                   f"{first.steps} steps in one batch, {first.backend} on {first.device}: "
                   f"{first.sampling_seconds:.1f} s; each group's other weights fixed at w*")
    diverged = [group for group, result in results.items() if result.healthy_chains == 0]
    if diverged:
        advice = divergence_advice(config.epsilon, config.nbeta, wbic_nbeta(run.config.make_task().n_train))
        raise FastLLCError(f"every chain of {', '.join(map(repr, diverged))} diverged (non-finite or exploding loss); "
                           f"{advice}")
