"""KVD and the paired bootstrap (osv/eval/intervals.py): exact against references, unbiased, paired."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from osv.eval.frechet import frechet_from_features
from osv.eval.intervals import (
    bootstrap,
    bootstrap_mean,
    bootstrap_ratio,
    frechet_lowrank,
    interval,
    kernel_distance,
    mmd2_unbiased,
    paired_difference,
    poly_kernel,
    resample,
)


@pytest.mark.parametrize("n1, n2, d", [(200, 200, 12), (200, 150, 12), (16, 16, 60), (16, 11, 60)])
def test_lowrank_frechet_is_pytorch_fid(n1, n2, d):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(n1, d)), rng.normal(size=(n2, d)) * 1.3 + 0.2
    assert frechet_lowrank(a, b) == pytest.approx(frechet_from_features(a, b), rel=1e-6)


def brute_mmd2(x, y) -> float:
    """The unbiased MMD² written out pair by pair (Gretton et al. 2012, eq. 3)."""
    k = lambda u, v: (u @ v / len(u) + 1) ** 3  # noqa: E731
    n = len(x)
    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(n)) / (n * n)
    return xx + yy - 2 * xy


def test_kernel_distance_is_the_unbiased_mmd():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(7, 5)), rng.normal(size=(7, 5)) + 0.5
    assert kernel_distance(x, y) == pytest.approx(brute_mmd2(x, y), rel=1e-10)


def test_kernel_distance_has_no_bias_between_equal_distributions():
    """Averaged over many draws of 16 clips from one distribution it is 0 (the V-statistic, which
    keeps the i = j terms, is positive by ~2·E k(x, x)/n)."""
    rng = np.random.default_rng(2)
    values = [kernel_distance(rng.normal(size=(16, 8)), rng.normal(size=(16, 8))) for _ in range(400)]
    assert abs(np.mean(values)) < 3 * np.std(values) / np.sqrt(len(values))
    shifted = [kernel_distance(rng.normal(size=(16, 8)), rng.normal(size=(16, 8)) + 0.5) for _ in range(50)]
    assert np.mean(shifted) > 10 * np.std(values) / np.sqrt(len(values))


def test_a_resample_leaves_out_pairs_of_the_same_clip():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
    kxx, kyy, kxy = poly_kernel(x, x), poly_kernel(y, y), poly_kernel(x, y)
    idx = np.array([0, 0, 2, 3, 3, 5])
    distinct = [(i, j) for i, j in itertools.product(range(6), repeat=2) if idx[i] != idx[j]]
    within = (np.mean([kxx[idx[i], idx[j]] for i, j in distinct]) + np.mean([kyy[idx[i], idx[j]] for i, j in distinct]))
    expected = within - 2 * kxy[np.ix_(idx, idx)].mean()
    assert mmd2_unbiased(kxx, kyy, kxy, idx) == pytest.approx(expected, rel=1e-12)
    # without duplicates a resample is a permutation: the statistic of the whole set
    assert mmd2_unbiased(kxx, kyy, kxy, rng.permutation(6)) == pytest.approx(kernel_distance(x, y), rel=1e-12)


def test_replicates_are_paired_across_methods():
    rng = np.random.default_rng(4)
    real, gen = rng.normal(size=(16, 10)), rng.normal(size=(16, 10)) + 0.3
    a, b = bootstrap(real, gen, 200, seed=7), bootstrap(real, gen, 200, seed=7)
    assert paired_difference(a["kvd"], b["kvd"]) == (0.0, 0.0)
    assert np.array_equal(resample(16, 5, 7), resample(16, 5, 7))
    worse = bootstrap(real, gen + 0.3, 200, seed=7)
    lo, hi = paired_difference(worse["kvd"], a["kvd"])
    assert 0 < lo < kernel_distance(real, gen + 0.3) - kernel_distance(real, gen) < hi


def test_interval_covers_the_estimate_and_narrows_with_more_clips():
    rng = np.random.default_rng(5)
    widths = []
    for n in (16, 128):
        real, gen = rng.normal(size=(n, 10)), rng.normal(size=(n, 10)) + 0.5
        reps = bootstrap(real, gen, 300, seed=0)
        lo, hi = interval(reps["kvd"])
        assert lo < kernel_distance(real, gen) < hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2


def test_mean_and_ratio_replicates_use_the_clip_resamples_of_fvd():
    """Per-clip metrics (frame-0 PSNR, ODE match, guidance absorption) resample the same clips as
    FVD/KVD: replicate b is the mean (or ratio of sums) over resample(n, B, seed)[b]."""
    rng = np.random.default_rng(3)
    values, num, den = rng.normal(30, 3, 12), rng.normal(0.5, 0.2, 12), rng.uniform(1, 2, 12)
    idx = resample(12, 40, 7)
    assert bootstrap_mean(values, 40, 7) == pytest.approx([values[i].mean() for i in idx], rel=1e-12)
    assert bootstrap_ratio(num, den, 40, 7) == pytest.approx([num[i].sum() / den[i].sum() for i in idx], rel=1e-12)
    lo, hi = interval(bootstrap_ratio(num, den, 1000, 0))
    assert lo < num.sum() / den.sum() < hi
    with pytest.raises(ValueError, match="ratio of sums"):
        bootstrap_ratio(num, den[:5], 4, 0)
