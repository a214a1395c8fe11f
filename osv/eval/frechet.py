"""Fréchet distance between Gaussian fits of two feature sets (FVD, FID).

The distance itself is pytorch-fid's `calculate_frechet_distance` (the reference
implementation everyone compares against); this module only fits the Gaussians
in float64 and handles the nearly singular covariances that small clip counts give.
"""

from __future__ import annotations

import numpy as np


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of features [N, D], in float64."""
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"need features [N>=2, D], got shape {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1-mu2||² + Tr(S1 + S2 - 2 (S1 S2)^½) via pytorch-fid, in float64.

    With fewer samples than feature dimensions the covariances are singular and
    sqrtm may return a large imaginary part; pytorch-fid then raises. We retry
    once with eps·I added to both covariances (its own fallback for a
    non-finite product) so tiny protocols still give a number; callers record
    the clip counts so such numbers are only compared within one protocol.
    """
    import warnings

    from pytorch_fid.fid_score import calculate_frechet_distance
    from scipy.linalg import LinAlgWarning

    args = [np.asarray(a, dtype=np.float64) for a in (mu1, sigma1, mu2, sigma2)]
    with warnings.catch_warnings():  # "Matrix is singular": expected with fewer clips than dimensions
        warnings.simplefilter("ignore", LinAlgWarning)
        try:
            return float(calculate_frechet_distance(*args, eps=eps))
        except ValueError:
            offset = np.eye(args[1].shape[0]) * eps
            return float(calculate_frechet_distance(args[0], args[1] + offset, args[2], args[3] + offset, eps=eps))


def frechet_from_features(feats1: np.ndarray, feats2: np.ndarray) -> float:
    """Fréchet distance of the Gaussian fits of two feature sets [N, D]."""
    return frechet_distance(*gaussian_stats(feats1), *gaussian_stats(feats2))
