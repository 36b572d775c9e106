"""``fastllc lm``: λ̂ of a local Hugging Face causal LM on saved token ids (``fastllc.lm``), whole, restricted
to named parts, or per head/layer in one batched run."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np
import torch

from ..errors import FastLLCError
from .common import one_line_errors


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


@click.command("lm")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("tokens_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--chains", type=int, default=4, show_default=True, help="SGLD chains (per group with --groups).")
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
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a summary.")
@one_line_errors
def lm_command(model_dir, tokens_file, chains, steps, burn_in, epsilon, gamma, nbeta, batch_size, seed, restrict,
               groups, init_sequences, max_memory_mib, as_json):
    """λ̂ of the causal LM saved (save_pretrained) in MODEL_DIR on the token ids in TOKENS_FILE (.npy or .pt)."""
    from .. import lm

    tokens, loss_mask = load_tokens(tokens_file)
    settings = dict(chains=chains, steps=steps, burn_in=burn_in, epsilon=epsilon, gamma=gamma, nbeta=nbeta,
                    batch_size=batch_size, seed=seed, loss_mask=loss_mask, init_sequences=init_sequences,
                    max_memory=None if max_memory_mib is None else max_memory_mib * 2**20)
    if groups is not None:
        if restrict:
            raise FastLLCError("--groups and --restrict do not go together: give the parts as --groups a,b,c")
        chosen = groups if groups in ("per-head", "per-layer") else [g.strip() for g in groups.split(",") if g.strip()]
        results = lm.estimate_groups(str(model_dir), tokens, groups=chosen, **settings)
        click.echo(json.dumps(results.to_dict()) if as_json else results.table())
        return
    result = lm.estimate(str(model_dir), tokens, restrict=list(restrict) or None, **settings)
    if as_json:
        click.echo(result.to_json())
        return
    part = f" of {result.sampled_weights:,} weights ({', '.join(restrict)})" if restrict else ""
    click.echo(f"λ̂{part} = {result.llc_mean:.4g} ± {result.llc_se:.2g} (se), {result.healthy_chains}/{result.chains} "
               f"healthy chains, L_n(w*) = {result.init_loss:.5g}, {result.chain_steps_per_second:.0f} chain-steps/s")
