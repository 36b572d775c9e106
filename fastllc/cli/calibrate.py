"""``fastllc calibrate``: a grid of step sizes (scaled by the curvature at w*, or given) × nβ × γ on one
checkpoint of a run, as one batched run; a table (or JSON), a recommended cell with its reason and a 90%
interval, and optionally a figure (``fastllc.calibration``)."""

from __future__ import annotations

import json
from pathlib import Path

import click
import torch.nn.functional as F

from ..analysis.plots import plot_calibration
from ..backends import CHOICES as BACKEND_CHOICES, resolve_backend
from ..calibration import DEFAULT_NBETA_MULTIPLES, DEFAULT_STEP_SCALES, DEFAULT_STEPS, calibrate, check_grid
from ..errors import FastLLCError
from ..sampling import SGLDConfig, resolve_device
from ..train import Run
from .common import check_plot_path, long_work, one_line_errors, progress, require_run_sampling_memory

DEFAULT_STEP_SCALES_TEXT = ",".join(f"{s:g}" for s in DEFAULT_STEP_SCALES)


def parse_grid(option: str, text: str | None, allow_zero: bool = False) -> tuple[float, ...] | None:
    """``--epsilons 1e-4,3e-4``: the values as floats, checked as the library checks a grid (one line)."""
    if text is None:
        return None
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise FastLLCError(f"{option} {text!r}: give comma-separated numbers, like 1e-4,3e-4") from None
    return check_grid(option, values, allow_zero=allow_zero)


@click.command("calibrate")
@click.option("--run", "run_dir", type=click.Path(path_type=Path), required=True,
              help="A run directory from `fastllc train`.")
@click.option("--checkpoint", type=int, default=None, help="Checkpoint index [default: the final weights].")
@click.option("--step-scales", default=DEFAULT_STEP_SCALES_TEXT, show_default=True,
              help="Step sizes as s = ε·nβ·κ (κ: the loss's largest curvature at w*, measured), comma-separated.")
@click.option("--epsilons", default=None, help="Step sizes ε (absolute), comma-separated: replaces --step-scales.")
@click.option("--nbetas", default=None, help="Inverse temperatures nβ (absolute), comma-separated "
                                             "[default: n/log n].")
@click.option("--gammas", default="5", show_default=True, help="Localisation strengths γ, comma-separated.")
@click.option("--chains", type=int, default=4, show_default=True, help="Chains per cell.")
@click.option("--steps", type=int, default=DEFAULT_STEPS, show_default=True,
              help="SGLD steps per chain (the length the rule was measured at).")
@click.option("--target-ess", type=float, default=None,
              help="Rerun the recommended cell (and its half step) with twice the steps until split-R̂ ≤ 1.01 "
                   "and its ESS reaches this.")
@click.option("--max-chain-steps", type=int, default=None,
              help="Budget for --target-ess: chain-steps in all [default: 8× the grid's].")
@click.option("--burn-in", type=int, default=None, help="Steps dropped from each chain [default: steps/4].")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Minibatch size m.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the SGLD noise and minibatches.")
@click.option("--mala", is_flag=True, help="Record the MALA acceptance per cell (backend generic).")
@click.option("--backend", default="auto", show_default=True, help=f"One of {', '.join(BACKEND_CHOICES)}.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, or auto (cuda when available).")
@click.option("--plot", type=click.Path(path_type=Path), default=None,
              help="Save a figure: λ̂ against ε per nβ, and the recommended cell's loss traces.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@one_line_errors
def calibrate_command(run_dir, checkpoint, step_scales, epsilons, nbetas, gammas, chains, steps, target_ess, max_chain_steps, burn_in, batch_size, seed, mala,
                      backend, device, plot, as_json):
    """Run a grid of SGLD settings on a checkpoint in one batch and recommend one (exit 1 when none is)."""
    epsilons = parse_grid("--epsilons", epsilons)
    step_scales = parse_grid("--step-scales", step_scales)
    nbetas = parse_grid("--nbetas", nbetas)
    gammas = parse_grid("--gammas", gammas, allow_zero=True)
    burn_in = steps // 4 if burn_in is None and isinstance(steps, int) else burn_in
    cells = len(epsilons or step_scales) * len(gammas) * len(nbetas or DEFAULT_NBETA_MULTIPLES)
    if chains < 1:
        raise FastLLCError(f"--chains must be at least 1 per cell, got {chains}")
    config = SGLDConfig(chains=cells * chains, steps=steps, burn_in=burn_in, batch_size=batch_size, seed=seed,
                        mala=mala).validate()
    if plot is not None:
        check_plot_path(plot)  # before any work: results that cannot be saved are not computed
    device = resolve_device(device)
    name = resolve_backend(backend, device, needs=config.needs())
    run = Run.load(run_dir)
    index = run.checkpoint_index(checkpoint)
    require_run_sampling_memory(run.config, config, device)
    model = run.load_model(index)
    with long_work(f"calibrating: {cells} cells × {chains} chains × {steps} steps ({name} on {device})",
                   "calibrated"):
        result = calibrate(model, run.task().train_data(), F.cross_entropy, epsilons=epsilons,
                           step_scales=step_scales, nbetas=nbetas,
                           gammas=gammas, chains=chains, steps=steps, burn_in=burn_in, batch_size=batch_size,
                           seed=seed, mala=mala, target_ess=target_ess, max_chain_steps=max_chain_steps,
                           backend=backend, device=device, progress=progress())
    if as_json:
        click.echo(json.dumps(dict(result.to_dict(), run=str(run.path), checkpoint=index, step=run.steps[index])))
    else:
        click.echo(f"run       {run.path}  checkpoint {index} (step {run.steps[index]}), n = {result.n}, "
                   f"n/log n = {result.default_nbeta:.4g}")
        click.echo(f"sampling  {len(result.cells)} cells × {result.chains} chains × {result.steps} steps "
                   f"(burn-in {result.burn_in}), {result.backend} on {result.device}: {result.sampling_seconds:.1f} s")
        click.echo(result.table())
        if result.extension is not None:
            click.echo(f"extended  {result.extension['status']} ({result.extension['chain_steps']:,} chain-steps)")
    if plot is not None:
        plot_calibration(result, plot, title=f"calibration of {run.path.name}, checkpoint {index}")
        if not as_json:
            click.echo(f"figure    {plot}")
    if result.recommended is None:
        raise FastLLCError(result.hint)
