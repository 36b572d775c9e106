"""fastllc.lm.estimate_series: every checkpoint's chains in one batch equal each checkpoint's own run, memory-planned
groups equal one group, directories and state dicts, a restricted series, the table's R̂ flag, the plot, the
command line, and one-line errors."""

import json
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner

import fastllc.lm as lm
from fastllc.cli import main
from fastllc.errors import FastLLCError
from fastllc.lm.series import SeriesPoint, SeriesResult, series_plan

from lm_models import CONTEXT, gpt2, tokens

SETTINGS = dict(steps=12, batch_size=4, epsilon=1e-4, gamma=1000.0, nbeta=20.0, chains=3)


def checkpoints(count=3):
    models = []
    for seed in range(count):
        torch.manual_seed(seed)
        models.append(gpt2())
    return models


def test_every_checkpoints_chains_follow_its_own_run():
    models, toks = checkpoints(), tokens(16)
    series = lm.estimate_series(models, toks, **SETTINGS)
    assert [p.label for p in series] == ["#0", "#1", "#2"] and all(p.step is None for p in series)
    for model, point in zip(models, series):
        alone = lm.estimate(model, toks, **SETTINGS)
        assert point.result.init_loss == alone.init_loss
        # the same minibatches and noise per chain; w*_k + δ rounded where a lone run accumulates w: fp32 rounding
        torch.testing.assert_close(point.result.loss_trace, alone.loss_trace, rtol=1e-5, atol=1e-5)
        assert point.result.llc_per_chain == pytest.approx(alone.llc_per_chain, rel=1e-4, abs=1e-4)


def test_memory_planned_groups_straddling_checkpoints_equal_one_group():
    models, toks = checkpoints(), tokens(16)
    budget_plan = series_plan(models[0], 3, 9, 4, 16, CONTEXT, max_memory=10**12)
    budget = budget_plan.budget_for(4)
    assert series_plan(models[0], 3, 9, 4, 16, CONTEXT, max_memory=budget).groups == [(0, 4), (4, 8), (8, 9)]
    one, grouped = (lm.estimate_series(models, toks, max_memory=m, **SETTINGS) for m in (None, budget))
    for a, b in zip(one, grouped):
        assert torch.equal(a.result.loss_trace, b.result.loss_trace)


def test_directories_and_state_dicts_sorted_by_their_training_step(tmp_path):
    models, toks = checkpoints(), tokens(16)
    for step, model in zip((1000, 20, 300), models):
        model.save_pretrained(tmp_path / "dirs" / f"checkpoint-{step}")
        (tmp_path / "files").mkdir(exist_ok=True)
        torch.save(model.state_dict(), tmp_path / "files" / f"step{step}.pt")
    from_dirs = lm.estimate_series(str(tmp_path / "dirs"), toks, **SETTINGS)
    assert [(p.label, p.step) for p in from_dirs] == [("checkpoint-20", 20), ("checkpoint-300", 300),
                                                      ("checkpoint-1000", 1000)]
    from_files = lm.estimate_series(tmp_path / "files", toks, model=gpt2(), **SETTINGS)
    assert [p.step for p in from_files] == [20, 300, 1000]
    by_step = lm.estimate_series({1000: models[0], 20: models[1], 300: models[2]}, toks, **SETTINGS)
    for a, b, c in zip(from_dirs, from_files, by_step):
        assert a.result.init_loss == pytest.approx(b.result.init_loss, rel=1e-6) == c.result.init_loss
        torch.testing.assert_close(a.result.loss_trace, c.result.loss_trace, rtol=1e-5, atol=1e-5)


def test_a_restricted_series_samples_one_head_of_every_checkpoint():
    models, toks = checkpoints(2), tokens(16)
    series = lm.estimate_series(models, toks, restrict="l0h1", **SETTINGS)
    alone = lm.estimate(models[1], toks, restrict="l0h1", **SETTINGS)
    assert series[1].result.sampled_weights == alone.sampled_weights == 3 * 32 * 8 + 3 * 8 + 8 * 32
    assert series[1].result.llc_per_chain == pytest.approx(alone.llc_per_chain, rel=1e-4, abs=1e-4)


def test_table_flags_unmixed_chains_and_the_plot_is_a_png(tmp_path):
    series = lm.estimate_series(checkpoints(2), tokens(16), training_steps=[10, 2000], **SETTINGS)
    flagged = SeriesResult([series[0], SeriesPoint("late", 2000, replace(series[1].result, r_hat=1.5))])
    table = flagged.table()
    assert "1.500!" in table and "split-R̂ > 1.1" in table and "2000" in table
    assert "!" not in series.table().splitlines()[1]  # R̂ below the limit: no flag
    path = flagged.plot(tmp_path / "series.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(flagged.to_json())[1]["step"] == 2000


def test_bad_series_are_refused_in_one_line(tmp_path):
    models, toks = checkpoints(1), tokens(16)
    (tmp_path / "empty").mkdir()
    (tmp_path / "nameless").mkdir()
    models[0].save_pretrained(tmp_path / "nameless" / "final")
    cases = [([], "no checkpoints"), (str(tmp_path / "empty"), "holds no checkpoints"),
             (str(tmp_path / "nameless"), "cannot tell the training step of 'final'"),
             ([models[0].state_dict()], "need model="), ([models[0], gpt2(layers=1)], "differ in their parameters"),
             ("missing-dir", "is not a directory")]
    for checkpoints_, message in cases:
        with pytest.raises(FastLLCError, match=message):
            lm.estimate_series(checkpoints_, toks, **SETTINGS)
    with pytest.raises(FastLLCError, match="orthogonal=False"):
        lm.estimate_series(models, toks, orthogonal=True, **SETTINGS)
    with pytest.raises(FastLLCError, match="does not fit the model"):
        lm.estimate_series([{"transformer.wte.weight": torch.zeros(3)}], toks, model=gpt2(), **SETTINGS)


def test_command_line_series_with_a_plot(tmp_path):
    for step, model in zip((5, 50), checkpoints(2)):
        model.save_pretrained(tmp_path / "run" / f"step{step}")
    torch.save({"input_ids": tokens(12)}, tmp_path / "tokens.pt")
    fast = ["--steps", "8", "--batch-size", "4", "--chains", "2", "--nbeta", "20", "--epsilon", "1e-4"]
    out = CliRunner().invoke(main, ["lm", "estimate", "--series", str(tmp_path / "run"), str(tmp_path / "tokens.pt"),
                                    "--plot", str(tmp_path / "llc.png"), *fast])
    assert out.exit_code == 0, out.output
    assert "step5" in out.output and "step50" in out.output and (tmp_path / "llc.png").exists()
    out = CliRunner().invoke(main, ["lm", "--series", str(tmp_path / "run"), str(tmp_path / "tokens.pt"), "--json", *fast])
    assert out.exit_code == 0 and [p["step"] for p in json.loads(out.output)] == [5, 50]
    out = CliRunner().invoke(main, ["lm", "estimate", str(tmp_path / "run" / "step5"), str(tmp_path / "tokens.pt"),
                                    "--plot", str(tmp_path / "x.png")])
    assert out.exit_code == 1 and "--plot draws" in out.output and "Traceback" not in out.output
    out = CliRunner().invoke(main, ["lm", "estimate", "--series", str(tmp_path / "run"), str(tmp_path / "tokens.pt"),
                                    "--plot", str(tmp_path / "x.unknown")])
    assert out.exit_code == 1 and "matplotlib cannot write" in out.output
