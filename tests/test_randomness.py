"""Counter-based randomness: determinism by (seed, chain, step), and the statistics of what it draws."""

import math

import numpy as np
import pytest

from fastllc.sampling.randomness import CounterRandomness


def fill(rng, chains, step, m=None, d=None):
    chains = np.asarray(chains, np.int64)
    indices = np.empty((len(chains), m or rng.batch_size), np.int64)
    noise = np.empty((len(chains), d or rng.dim), np.float32)
    rng.fill(chains, step, indices, noise)
    return indices, noise


def test_draws_depend_only_on_seed_chain_and_step():
    rng = CounterRandomness(seed=3, n=50, batch_size=4, dim=6)
    many_indices, many_noise = fill(rng, range(64), step=40)
    few_indices, few_noise = fill(rng, [2, 5], step=40)
    assert np.array_equal(many_indices[[2, 5]], few_indices) and np.array_equal(many_noise[[2, 5]], few_noise)
    one_indices, one_noise = rng.draw(5, 40)
    assert np.array_equal(one_indices.numpy(), few_indices[1]) and np.array_equal(one_noise.numpy(), few_noise[1])
    assert not np.array_equal(few_noise[0], few_noise[1])
    assert not np.array_equal(fill(rng, [2], 41)[1][0], few_noise[0])
    assert not np.array_equal(fill(CounterRandomness(4, 50, 4, 6), [2], 40)[1][0], few_noise[0])


def test_noise_is_standard_normal():
    """3.3M draws: each moment's tolerance is ~5 standard errors of its estimator."""
    _, noise = fill(CounterRandomness(seed=0, n=1, batch_size=1, dim=3203), range(1031), step=7)
    x = noise.astype(np.float64).ravel()
    se = 1 / math.sqrt(x.size)
    assert abs(x.mean()) < 5 * se
    assert abs(x.var() - 1) < 5 * math.sqrt(2) * se
    assert abs((x**3).mean()) < 5 * math.sqrt(15) * se
    assert abs((x**4).mean() - 3) < 5 * math.sqrt(96) * se
    # the CDF at a few points, including the ziggurat's tail (|x| > 3.44) and its wedges
    for point in (-3.6, -2.0, -0.5, 0.3, 1.0, 2.7, 3.6):
        expected = 0.5 * (1 + math.erf(point / math.sqrt(2)))
        assert abs((x < point).mean() - expected) < 5 * math.sqrt(expected * (1 - expected)) * se
    assert abs(x).max() > 4.0  # the tail is reached


def test_noise_elements_are_uncorrelated_across_neighbours_chains_and_steps():
    rng = CounterRandomness(seed=1, n=1, batch_size=1, dim=4096)
    _, a = fill(rng, range(256), step=0)
    _, b = fill(rng, range(256), step=1)
    a, b = a.astype(np.float64), b.astype(np.float64)
    bound = 5 / math.sqrt(a.size)
    assert abs((a[:, 1:] * a[:, :-1]).mean()) < bound
    assert abs((a[1:] * a[:-1]).mean()) < bound
    assert abs((a * b).mean()) < bound


@pytest.mark.parametrize("n", [1, 7, 1000])
def test_indices_are_uniform(n):
    indices, _ = fill(CounterRandomness(seed=2, n=n, batch_size=64, dim=1), range(2000), step=3)
    assert indices.min() >= 0 and indices.max() < n
    counts = np.bincount(indices.ravel(), minlength=n)
    expected = indices.size / n
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < (n - 1) + 5 * math.sqrt(2 * max(n - 1, 1))  # chi-square with n-1 dof: mean n-1, sd √(2(n-1))


def test_parameter_major_layout_holds_the_same_numbers():
    rng = CounterRandomness(seed=5, n=10, batch_size=2, dim=11)
    chains = np.array([3, 0, 9], np.int64)
    _, rows = fill(rng, chains, step=2)
    blocks = np.array([0, 4, 5, 11], np.int64)
    flat = np.empty(3 * 11, np.float32)
    rng.fill(chains, 2, np.empty((3, 2), np.int64), flat, blocks)
    for lo, hi in zip(blocks[:-1], blocks[1:]):
        np.testing.assert_array_equal(flat[3 * lo : 3 * hi].reshape(3, hi - lo), rows[:, lo:hi])


@pytest.mark.parametrize("variant", ["avx512", "avx2", "scalar"])
def test_the_native_fill_is_the_python_fill_bit_for_bit(monkeypatch, variant):
    """``fastllc_draw_noise`` (the native kernel's vectorised ziggurat, used from ``NATIVE_MIN`` floats a step) writes
    the Numba fill's values, bit for bit, in blocked layouts with odd block sizes and chains out of order."""
    from fastllc import native_build
    from fastllc.sampling import randomness

    if variant not in native_build.variants():
        pytest.skip(f"this CPU does not run the {variant} build")
    try:
        draw_noise = native_build.load(variant).fastllc_draw_noise
    except native_build.NativeUnavailable as err:
        pytest.skip(f"the native kernel cannot be built here: {err}")
    d = 40_003
    r = CounterRandomness(seed=7, n=1000, batch_size=4, dim=d)
    chains = np.array([9, 0, 5], np.int64)
    for blocks in (np.array([0, d], np.int64), np.array([0, 3, 20_000, 20_001, 39_990, d], np.int64)):
        python = np.empty(3 * d, np.float32)
        monkeypatch.setattr(randomness, "_native_fill", lambda: None)
        r.fill(chains, 11, np.empty((3, 4), np.int64), python, blocks)
        native = np.full(3 * d, np.nan, np.float32)
        monkeypatch.setattr(randomness, "_native_fill", lambda: draw_noise)
        r.fill(chains, 11, np.empty((3, 4), np.int64), native, blocks)
        assert np.array_equal(native.view(np.int32), python.view(np.int32))
    assert 3 * d >= randomness.NATIVE_MIN  # the native path was the one taken above
