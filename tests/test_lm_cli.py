"""``fastllc lm``: a saved tiny GPT-2 and saved token ids, whole, restricted, per head; errors in one line."""

import json

import numpy as np
import torch
from click.testing import CliRunner

from fastllc.cli import main

from lm_models import gpt2, tokens

FAST = ["--steps", "8", "--batch-size", "4", "--chains", "2", "--nbeta", "20", "--epsilon", "1e-4"]


def saved(tmp_path):
    model_dir = tmp_path / "model"
    gpt2().save_pretrained(model_dir)
    torch.save({"input_ids": tokens(12)}, tmp_path / "tokens.pt")
    np.save(tmp_path / "tokens.npy", tokens(12).numpy())
    return str(model_dir)


def test_lm_command_whole_restricted_and_per_head(tmp_path):
    model_dir = saved(tmp_path)
    out = CliRunner().invoke(main, ["lm", model_dir, str(tmp_path / "tokens.npy"), *FAST])
    assert out.exit_code == 0, out.output
    assert "λ̂ = " in out.output and "2/2 healthy" in out.output
    out = CliRunner().invoke(main, ["lm", model_dir, str(tmp_path / "tokens.pt"), *FAST, "--restrict", "l0h1", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["sampled_weights"] == 3 * 32 * 8 + 3 * 8 + 8 * 32
    out = CliRunner().invoke(main, ["lm", model_dir, str(tmp_path / "tokens.pt"), *FAST, "--groups", "l0h0,l1 mlp"])
    assert out.exit_code == 0, out.output
    assert "l0h0" in out.output and "l1 mlp" in out.output


def test_lm_command_errors_in_one_line(tmp_path):
    model_dir = saved(tmp_path)
    out = CliRunner().invoke(main, ["lm", model_dir, str(tmp_path / "tokens.pt"), *FAST, "--restrict", "l9h0"])
    assert out.exit_code == 1 and "layers 0 to 1" in out.output and "Traceback" not in out.output
    out = CliRunner().invoke(main, ["lm", model_dir, str(tmp_path / "tokens.pt"), "--groups", "per-head", "--restrict", "l0"])
    assert out.exit_code == 1 and "do not go together" in out.output


def test_lm_command_bf16_is_the_api_run_under_autocast(tmp_path):
    """--bf16 passes bf16=True through: the command's λ̂ is fastllc.lm.estimate's bf16 run (same seed, so the same
    number), and differs from the float32 run (so the flag did something)."""
    from fastllc import lm

    model_dir = saved(tmp_path)
    out = CliRunner().invoke(main, ["lm", model_dir, str(tmp_path / "tokens.pt"), *FAST, "--bf16", "--json"])
    assert out.exit_code == 0, out.output
    shown = json.loads(out.output)["llc_mean"]
    settings = dict(steps=8, batch_size=4, chains=2, nbeta=20.0, epsilon=1e-4, gamma=1000.0, seed=0)
    assert shown == lm.estimate(model_dir, tokens(12), bf16=True, **settings).llc_mean
    assert shown != lm.estimate(model_dir, tokens(12), **settings).llc_mean
