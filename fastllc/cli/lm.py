"""``fastllc lm [estimate]``: λ̂ of a local Hugging Face causal LM on saved token ids (``fastllc.lm``), whole,
restricted to named parts, per head/layer in one batched run, or along a series of checkpoints (``--series``,
with ``--plot``)."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np
import torch

from ..errors import FastLLCError
from .common import check_plot_path, one_line_errors


def load_tokens(path: Path):
    """Token ids from a ``.npy`` array [N, T] or a ``torch.save`` file (a LongTensor, or a dict with ``input_ids``
    and optionally ``loss_mask``): (tokens, loss_mask or None)."""
    if path.suffix == ".npy":
        return torch.from_numpy(np.load(path)), None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file: one line
        raise FastLLCError(f"cannot read tokens from {path}: {type(error).__name__}: {error}") from None
    if isinstance(saved, dict):
        if "input_ids" not in saved:
            raise FastLLCError(f"{path} holds a dict without 'input_ids'")
        return saved["input_ids"], saved.get("loss_mask")
    return saved, None


class _EstimateByDefault(click.Group):
    """``fastllc lm MODEL_DIR TOKENS ...`` (the command's first form) is ``fastllc lm estimate MODEL_DIR TOKENS ...``."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["estimate", *args]
        return super().parse_args(ctx, args)


@click.group("lm", cls=_EstimateByDefault)
def lm_command():
    """λ̂ of local Hugging Face causal LMs on saved token ids: 'fastllc lm MODEL_DIR TOKENS_FILE' is
    'fastllc lm estimate MODEL_DIR TOKENS_FILE'; 'fastllc lm estimate --series DIR TOKENS_FILE --plot llc.png'
    estimates every checkpoint of a training run."""


@lm_command.command("estimate")
@click.argument("paths", nargs=-1, metavar="[MODEL_DIR] TOKENS_FILE", type=click.Path(exists=True, path_type=Path))
@click.option("--series", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A directory of checkpoints (save_pretrained directories, or state-dict files with MODEL_DIR the "
                   "architecture), named with their training step: λ̂ of every one, all in one batched run.")
@click.option("--plot", type=click.Path(path_type=Path), default=None,
              help="With --series: λ̂ ± standard error against the training step, to this file (.png).")
@click.option("--chains", type=int, default=4, show_default=True, help="SGLD chains (per group or checkpoint).")
@click.option("--steps", type=int, default=200, show_default=True, help="SGLD steps per chain.")
@click.option("--burn-in", type=int, default=0, show_default=True, help="Steps dropped from the average.")
@click.option("--epsilon", type=float, default=5e-5, show_default=True, help="Step size ε.")
@click.option("--gamma", type=float, default=1000.0, show_default=True, help="Localisation strength γ.")
@click.option("--nbeta", type=float, default=None, help="Inverse temperature nβ [default: n/log n of the sequences].")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Minibatch size in sequences.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the SGLD noise and minibatches.")
@click.option("--restrict", multiple=True, help="Sample only these parts ('l0h1', 'l0 mlp', 'embed', a parameter "
                                                 "name or glob); repeatable.")
@click.option("--groups", default=None, help="'per-head', 'per-layer' or comma-separated part names: λ̂ of each, "
                                              "in one batched run.")
@click.option("--init-sequences", type=int, default=None, help="L_n(w*) over this many sequences [default: all].")
@click.option("--max-memory-mib", type=int, default=None, help="Memory the chains may take [default: half the "
                                                                "available memory].")
@click.option("--bf16", is_flag=True, help="Forward and backward passes under bf16 autocast (weights, noise and the "
                                         "SGLD update stay float32; backend generic).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (a list with --series) instead.")
@one_line_errors
def estimate_command(paths, series, plot, chains, steps, burn_in, epsilon, gamma, nbeta, batch_size, seed, restrict,
                     groups, init_sequences, max_memory_mib, bf16, as_json):
    """λ̂ of the causal LM saved (save_pretrained) in MODEL_DIR, or of every checkpoint in --series, on the token
    ids in TOKENS_FILE (.npy or .pt)."""
    model_dir, tokens_file = _paths(paths, series, plot, groups)
    tokens, loss_mask = load_tokens(tokens_file)
    settings = dict(chains=chains, steps=steps, burn_in=burn_in, epsilon=epsilon, gamma=gamma, nbeta=nbeta,
                    batch_size=batch_size, seed=seed, loss_mask=loss_mask, init_sequences=init_sequences,
                    max_memory=None if max_memory_mib is None else max_memory_mib * 2**20, bf16=bf16)
    if series is not None:
        _series(series, model_dir, tokens, list(restrict) or None, plot, as_json, settings)
    elif groups is not None:
        _groups(model_dir, tokens, groups, restrict, as_json, settings)
    else:
        _single(model_dir, tokens, restrict, as_json, settings)


def _paths(paths, series, plot, groups) -> tuple[Path | None, Path]:
    """(MODEL_DIR or None, TOKENS_FILE), checked against the options."""
    if series is None and len(paths) != 2:
        raise FastLLCError("give MODEL_DIR and TOKENS_FILE (or --series DIR and TOKENS_FILE)")
    if series is not None and len(paths) not in (1, 2):
        raise FastLLCError("with --series give TOKENS_FILE, or MODEL_DIR (the architecture of state-dict checkpoints) "
                           "and TOKENS_FILE")
    if plot is not None and series is None:
        raise FastLLCError("--plot draws λ̂ along a --series of checkpoints; give --series DIR")
    if series is not None and groups is not None:
        raise FastLLCError("--series and --groups do not go together: estimate one part along the series with --restrict")
    model_dir, tokens_file = (None, paths[0]) if len(paths) == 1 else paths
    if model_dir is not None and not model_dir.is_dir():
        raise FastLLCError(f"MODEL_DIR {model_dir} is not a directory (a save_pretrained directory)")
    if not tokens_file.is_file():
        raise FastLLCError(f"TOKENS_FILE {tokens_file} is not a file (.npy or .pt)")
    if plot is not None:
        check_plot_path(plot)
    return model_dir, tokens_file


def _series(folder, model_dir, tokens, restrict, plot, as_json, settings) -> None:
    from .. import lm

    result = lm.estimate_series(str(folder), tokens, model=None if model_dir is None else str(model_dir),
                                restrict=restrict, **settings)
    click.echo(result.to_json() if as_json else result.table())
    if plot is not None:
        result.plot(plot, title=f"λ̂ along training: {folder.name}")
        if not as_json:
            click.echo(f"plot: {plot}")


def _groups(model_dir, tokens, groups, restrict, as_json, settings) -> None:
    from .. import lm

    if restrict:
        raise FastLLCError("--groups and --restrict do not go together: give the parts as --groups a,b,c")
    chosen = groups if groups in ("per-head", "per-layer") else [g.strip() for g in groups.split(",") if g.strip()]
    results = lm.estimate_groups(str(model_dir), tokens, groups=chosen, **settings)
    click.echo(json.dumps(results.to_dict()) if as_json else results.table())


def _single(model_dir, tokens, restrict, as_json, settings) -> None:
    from .. import lm

    result = lm.estimate(str(model_dir), tokens, restrict=list(restrict) or None, **settings)
    if as_json:
        click.echo(result.to_json())
        return
    part = f" of {result.sampled_weights:,} weights ({', '.join(restrict)})" if restrict else ""
    click.echo(f"λ̂{part} = {result.llc_mean:.4g} ± {result.llc_se:.2g} (se), {result.healthy_chains}/{result.chains} "
               f"healthy chains, L_n(w*) = {result.init_loss:.5g}, {result.chain_steps_per_second:.0f} chain-steps/s")
