"""Kernel video distance and bootstrap intervals: metrics that come with their uncertainty.

KVD (StyleGAN-V) is KID (Bińkowski et al. 2018) on video features: the unbiased estimate of the
squared MMD with the cubic polynomial kernel k(x, y) = (x·y / d + 1)³. Unlike the Fréchet
distance it has no bias that depends on the number of clips, and it needs no covariance, so it
stays meaningful with fewer clips than feature dimensions.

Intervals: a bootstrap over test clips. Replicate b resamples clip indices with replacement
from a generator seeded by (eval.bootstrap seed, b), the same draws for every method, and,
since sample i of every method starts from test clip i's first frame, takes real[I] and
generated[I] together. Two methods' replicates are therefore paired, and the report takes the
interval of a difference from the replicate-wise differences. In a replicate the KVD excludes
pairs of the same source clip (duplicates would act as the i = j terms the unbiased estimate
leaves out); the Fréchet distance uses the exact low-rank form when clips are fewer than feature
dimensions (milliseconds instead of a d x d matrix square root).
"""

from __future__ import annotations

import numpy as np

# Below this, resamples of clips are mostly duplicates: no interval is worth printing.
MIN_CLIPS_FOR_INTERVALS = 8


def poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x·y / d + 1)³ for every pair of rows."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray, idx: np.ndarray | None = None) -> float:
    """Unbiased MMD² from kernel matrices; with `idx` (a resample of clip indices), of the resampled
    sets, leaving out within-set pairs of the same source clip."""
    if idx is None:
        idx = np.arange(kxx.shape[0])
    distinct = idx[:, None] != idx[None, :]
    if not distinct.any():
        raise ValueError("MMD² needs at least two distinct clips")
    sub = np.ix_(idx, idx)
    within = (kxx[sub][distinct].mean() + kyy[sub][distinct].mean())
    return float(within - 2 * kxy[sub].mean())


def kernel_distance(real: np.ndarray, gen: np.ndarray) -> float:
    """KVD (or KID on frame features) of two feature sets [N, D] of equal N."""
    real, gen = (np.asarray(a, dtype=np.float64) for a in (real, gen))
    return mmd2_unbiased(poly_kernel(real, real), poly_kernel(gen, gen), poly_kernel(real, gen))


def frechet_lowrank(real: np.ndarray, gen: np.ndarray) -> float:
    """Fréchet distance of the Gaussian fits (unbiased covariances) of two feature sets, exactly:
    Tr((S1 S2)^½) is the sum of the singular values of A1 A2ᵀ / √((n1−1)(n2−1)) with A the
    centred features, since S1 S2 and that n1 x n1 product share their non-zero eigenvalues."""
    a1, a2 = (np.asarray(a, dtype=np.float64) for a in (real, gen))
    c1, c2 = a1 - a1.mean(0), a2 - a2.mean(0)
    n1, n2 = len(a1) - 1, len(a2) - 1
    cross = np.linalg.svd(c1 @ c2.T / np.sqrt(n1 * n2), compute_uv=False).sum()
    mean_term = float(((a1.mean(0) - a2.mean(0)) ** 2).sum())
    return mean_term + float((c1 ** 2).sum() / n1 + (c2 ** 2).sum() / n2 - 2 * cross)


def resample(n: int, resamples: int, seed: int) -> np.ndarray:
    """[resamples, n] clip indices drawn with replacement; the same for every method."""
    return np.stack([np.random.default_rng([seed, b]).integers(0, n, n) for b in range(resamples)])


def bootstrap(real: np.ndarray, gen: np.ndarray, resamples: int, seed: int) -> dict[str, list[float]]:
    """FVD and KVD of every paired resample of clips (real[I], gen[I])."""
    real, gen = (np.asarray(a, dtype=np.float64) for a in (real, gen))
    if len(real) != len(gen):
        raise ValueError(f"paired bootstrap needs as many generated as real clips ({len(gen)} vs {len(real)})")
    kxx, kyy, kxy = poly_kernel(real, real), poly_kernel(gen, gen), poly_kernel(real, gen)
    out = {"fvd": [], "kvd": []}
    for idx in resample(len(real), resamples, seed):
        out["fvd"].append(frechet_lowrank(real[idx], gen[idx]))
        out["kvd"].append(mmd2_unbiased(kxx, kyy, kxy, idx))
    return out


def bootstrap_mean(values, resamples: int, seed: int) -> list[float]:
    """The mean of per-clip values (frame-0 PSNR, ODE match) over every resample of clips; the
    same resamples as `bootstrap`, so the replicates pair with FVD's and with other methods'."""
    values = np.asarray(values, dtype=np.float64)
    return [float(values[idx].mean()) for idx in resample(len(values), resamples, seed)]


def bootstrap_ratio(num, den, resamples: int, seed: int) -> list[float]:
    """Σ num / Σ den over every resample of clips (a ratio of sums, e.g. the guidance absorption)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    if num.shape != den.shape:
        raise ValueError(f"ratio of sums: {num.shape} numerators vs {den.shape} denominators")
    return [float(num[idx].sum() / den[idx].sum()) for idx in resample(len(num), resamples, seed)]


def interval(values, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap replicates."""
    lo, hi = np.quantile(np.asarray(values, dtype=np.float64), [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def paired_difference(a, b, level: float = 0.95) -> tuple[float, float]:
    """Interval of metric(a) − metric(b) from two methods' replicates drawn with the same indices."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"replicates are not paired: {a.shape} vs {b.shape}")
    return interval(a - b, level)
