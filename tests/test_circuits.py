"""Fourier circuit analysis: known synthetic answers, Numba against numpy, and a trained network."""

import errno
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from fastllc import TrainConfig, train
from fastllc.analysis import analyse_run, fourier_modes, keep_frequencies, learned_frequencies
from fastllc.analysis.circuits import candidate_frequencies
from fastllc.cli import main


def embedding_with(p, frequencies, embed=8, noise=0.05, seed=0):
    """Each chosen frequency as a circle (cos, sin) in its own pair of embedding dimensions, plus noise."""
    rng = np.random.default_rng(seed)
    j = np.arange(p)
    W = noise * rng.normal(size=(p, embed))
    for i, k in enumerate(frequencies):
        W[:, 2 * i] += np.cos(2 * np.pi * j * k / p)
        W[:, 2 * i + 1] += np.sin(2 * np.pi * j * k / p)
    return W


@pytest.mark.parametrize("p,chosen", [(43, [4, 8, 14]), (53, [6, 19, 2, 24]), (23, [11])])
def test_synthetic_circuits_are_found_exactly(p, chosen):
    modes = fourier_modes(embedding_with(p, chosen))
    assert sorted(learned_frequencies(modes)) == sorted(chosen)
    for k in chosen:
        assert modes.circularity[k - 1] > 0.95 and modes.roundness[k - 1] > 0.9


@pytest.mark.parametrize("seed", range(5))
def test_a_random_embedding_has_no_circuits(seed):
    W = np.random.default_rng(seed).normal(size=(53, 8))
    assert learned_frequencies(fourier_modes(W)) == []


def test_a_line_is_not_a_circuit():
    p, j = 43, np.arange(43)
    W = 0.01 * np.random.default_rng(0).normal(size=(p, 8))
    W[:, 0] += 3 * np.cos(2 * np.pi * j * 5 / p)  # one phase only: a line in its plane
    modes = fourier_modes(W)
    assert modes.roundness[4] < 0.1 and learned_frequencies(modes) == []


def test_numba_and_numpy_paths_agree():
    W = np.random.default_rng(1).normal(size=(31, 6))
    fast, slow = fourier_modes(W), fourier_modes(W, use_numba=False)
    np.testing.assert_allclose(fast.magnitudes, slow.magnitudes, rtol=1e-12)  # float64 sums of 31 terms
    np.testing.assert_allclose(fast.circularity, slow.circularity, atol=1e-12)
    np.testing.assert_allclose(fast.coordinates, slow.coordinates, atol=1e-12)


def test_magnitudes_match_numpy_fft():
    W = np.random.default_rng(2).normal(size=(29, 5))
    spectrum = np.fft.fft(W, axis=0)
    expected = np.sqrt(2 / 29 * (np.abs(spectrum[1:15]) ** 2).sum(axis=1))
    np.testing.assert_allclose(fourier_modes(W).magnitudes, expected, rtol=1e-12)


def test_circularity_of_circles_and_ellipses():
    p, j = 37, np.arange(37)
    circle = np.stack([np.cos(2 * np.pi * j * 3 / p), np.sin(2 * np.pi * j * 3 / p)], axis=1)
    assert fourier_modes(circle).circularity[2] == pytest.approx(1.0)
    ellipse = circle * np.array([1.0, 0.3])
    assert 0.5 <= fourier_modes(ellipse).circularity[2] < 0.99


def test_keeping_frequencies_is_a_projection():
    W = np.random.default_rng(3).normal(size=(13, 4))
    once = keep_frequencies(W, [2, 5])
    np.testing.assert_allclose(keep_frequencies(once, [2, 5]), once, atol=1e-12)
    np.testing.assert_allclose(keep_frequencies(W, range(1, 7)), W, atol=1e-12)  # p odd: all modes = identity


@pytest.mark.slow
def test_a_trained_network_has_circuits_and_they_carry_the_computation(trained_p23):
    report, _ = analyse_run(trained_p23)
    assert report.count >= 1
    learned = [report.ablation_test_loss[k - 1] for k in report.learned]
    unlearned = [loss for k, loss in zip(report.frequencies, report.ablation_test_loss) if k not in report.learned]
    # keeping one learned mode hurts far less than keeping one unlearned mode
    assert min(learned) < min(unlearned) - 0.3 and np.mean(learned) < np.mean(unlearned)
    # and the learned modes together nearly do the whole job (chance is log 23 = 3.1)
    assert report.learned_only_test_loss < 0.2 * math.log(23)


def test_circuits_cli(tmp_path, tiny_run, monkeypatch):
    import matplotlib

    def no_global_backend(*args, **kwargs):
        raise AssertionError("plots must not switch matplotlib's global backend")

    monkeypatch.setattr(matplotlib, "use", no_global_backend)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)  # importing pyplot now fails: the object API only
    report, _ = analyse_run(tiny_run)
    runner = CliRunner()
    result = runner.invoke(main, ["circuits", "--run", str(tiny_run.path), "--plot", str(tmp_path / "c.png")])
    assert result.exit_code == 0, result.output
    assert f"circuits   {report.count}: {report.learned}" in result.output.splitlines()
    assert (tmp_path / "c.png").stat().st_size > 10_000
    result = runner.invoke(main, ["circuits", "--run", str(tiny_run.path), "--plot", str(tmp_path / "c.svg")])
    assert result.exit_code == 0 and (tmp_path / "c.svg").read_text().lstrip().startswith("<?xml")
    record = json.loads(runner.invoke(main, ["circuits", "--run", str(tiny_run.path), "--json"]).stdout)
    assert record["p"] == 5 and len(record["magnitudes"]) == 2
    along = runner.invoke(main, ["circuits", "--run", str(tiny_run.path), "--along-training"])
    assert along.exit_code == 0 and len(along.output.splitlines()) == 1 + len(tiny_run.steps)


def test_circuits_cli_bad_input(tmp_path):
    runner = CliRunner()
    random_run = train(TrainConfig(p=7, task="random", batches=20, checkpoints=1), tmp_path / "random")
    result = runner.invoke(main, ["circuits", "--run", str(random_run.path)])
    assert result.exit_code == 0 and "no circuits are expected" in result.output
    small = train(TrainConfig(p=2, batches=5, checkpoints=1), tmp_path / "small")
    result = runner.invoke(main, ["circuits", "--run", str(small.path)])
    assert result.exit_code != 0 and "needs p >= 3" in result.output and "Traceback" not in result.output
    random_run.checkpoint_path().write_bytes(b"junk")
    result = runner.invoke(main, ["circuits", "--run", str(random_run.path)])
    assert result.exit_code != 0 and "corrupt" in result.output
    result = runner.invoke(main, ["circuits", "--run", str(tmp_path / "missing")])
    assert result.exit_code != 0 and "does not exist" in result.output


def one_error_line(result) -> str:
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    return errors[0]


@pytest.mark.parametrize("name,message", [
    ("circles.xyz", "--plot circles.xyz: matplotlib cannot write .xyz; end the name with one of .avif, .eps, .gif, "
                    ".jpeg, .jpg, .pdf, .pgf, .png, .ps, .raw, .rgba, .svg, .svgz, .tif, .tiff, .webp"),
    ("circles", "--plot circles: matplotlib cannot write a name without a suffix; end the name with one of .avif"),
])
def test_a_plot_type_matplotlib_cannot_write_is_refused_before_the_analysis(tmp_path, tiny_run, monkeypatch, name,
                                                                             message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("fastllc.analysis.analyse_run", lambda *a: pytest.fail("the analysis ran"))
    result = CliRunner().invoke(main, ["circuits", "--run", str(tiny_run.path), "--plot", name])
    assert message in one_error_line(result)
    assert sorted(tmp_path.iterdir()) == []


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, a directory nobody can write")
def test_a_plot_in_an_unwritable_place_is_refused(tiny_run):
    result = CliRunner().invoke(main, ["circuits", "--run", str(tiny_run.path), "--plot", "/proc/x.png"])
    assert "cannot write --plot /proc/x.png: /proc is not writable" in one_error_line(result)


def test_the_table_is_printed_before_a_plot_that_fails(tmp_path, tiny_run, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("fastllc.analysis.plots.plot_circuits", disk_full)
    result = CliRunner().invoke(main, ["circuits", "--run", str(tiny_run.path), "--plot", str(tmp_path / "c.png")])
    assert f"could not write the plot {tmp_path / 'c.png'}: No space left on device" in one_error_line(result)
    assert any(line.startswith("circuits   ") for line in result.output.splitlines())  # the table came first


def test_plot_with_along_training_is_refused(tmp_path, tiny_run):
    result = CliRunner().invoke(main, ["circuits", "--run", str(tiny_run.path), "--along-training",
                                       "--plot", str(tmp_path / "c.png")])
    assert "--plot draws one checkpoint and is not used with --along-training: drop one of them" in one_error_line(result)
    assert sorted(tmp_path.iterdir()) == []


# ---- a circuit needs a plane of its own: never more than e/2 ----


def circles_in_random_planes(p, frequencies, embed, seed=0, noise=0.01):
    """Each frequency a unit circle in a random 2-D plane of R^embed: more circles than e/2 must share planes."""
    rng = np.random.default_rng(seed)
    j = np.arange(p)
    W = noise * rng.normal(size=(p, embed))
    for k in frequencies:
        plane, _ = np.linalg.qr(rng.normal(size=(embed, 2)))
        W += np.stack([np.cos(2 * np.pi * j * k / p), np.sin(2 * np.pi * j * k / p)], axis=1) @ plane.T
    return W


@pytest.mark.parametrize("embed", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("seed", range(4))
def test_adversarial_embeddings_never_count_more_than_half_the_embedding(embed, seed):
    # two more round, equally strong circles than R^e has planes for (few enough of the 18 modes to stay
    # outliers): rules 1-2 alone count them all
    p = 37
    chosen = list(range(1, 3 * (embed // 2 + 2), 3))
    modes = fourier_modes(circles_in_random_planes(p, chosen, embed, seed))
    assert len(candidate_frequencies(modes)) > embed // 2  # the earlier rule overcounts here
    learned = learned_frequencies(modes)
    assert len(learned) <= embed // 2 and set(learned) <= set(chosen)


@pytest.mark.parametrize("embed", [4, 8, 9])
@pytest.mark.parametrize("seed", range(5))
def test_random_embeddings_never_count_more_than_half_the_embedding(embed, seed):
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(53, embed)) * rng.uniform(0.1, 3, size=(53, 1))  # heavy-tailed rows: ragged spectra
    assert len(learned_frequencies(fourier_modes(W))) <= embed // 2


def test_a_leaked_mode_in_a_counted_plane_is_not_a_second_circuit():
    # frequency 9 drawn in the plane of frequency 3 (a weak copy): round and an outlier, but no plane of its own
    p, j = 37, np.arange(37)
    W = embedding_with(p, [3, 11], noise=0.01)
    W[:, 0] += 0.3 * np.cos(2 * np.pi * j * 9 / p)
    W[:, 1] += 0.3 * np.sin(2 * np.pi * j * 9 / p)
    modes = fourier_modes(W)
    assert 9 in candidate_frequencies(modes) and sorted(learned_frequencies(modes)) == [3, 11]
