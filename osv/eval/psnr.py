"""PSNR of uint8 RGB frames, in the VAE stage's convention (osv/vae.py psnr_db): pixels in [0, 1],
10 log10(1 / MSE) with the MSE floored at 1e-12, so identical frames give 120 dB (finite, as
every metric file must be) and a clip set's PSNR is the mean over clips of the clip PSNR.

Used by `osv fvd` (frame-0 PSNR: generated frame 0 against the test clip's frame 0, the
conditioning frame) and `osv report` (teacher-ODE match: each method's clip against
teacher_25's clip from the same noise and first frame).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

MSE_FLOOR = 1e-12  # osv/vae.py psnr_db: 120 dB for identical frames
IDENTICAL_DB = 10 * math.log10(1.0 / MSE_FLOOR)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB) of two uint8 arrays of one shape (a frame [H, W, 3] or a clip [T, H, W, 3]).

    The squared error is summed frame by frame as integers held exactly in float64 (a BLAS dot,
    8 ms per 1024x576 frame instead of 30 for the float expression; memory: one frame)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"PSNR of arrays of different shapes: {list(a.shape)} vs {list(b.shape)}")
    if a.dtype != np.uint8 or b.dtype != np.uint8:
        raise ValueError(f"PSNR of uint8 frames, got {a.dtype} and {b.dtype}")
    rows = a.shape[0] if a.ndim == 4 else 1
    sse = 0.0
    for x, y in zip(a.reshape(rows, -1), b.reshape(rows, -1)):
        d = np.subtract(x, y, dtype=np.int16).astype(np.float64)
        sse += float(np.dot(d, d))  # < 2^53: exact
    return 10 * math.log10(1.0 / max(sse / a.size / 255.0**2, MSE_FLOOR))


def first_frame(path: str | Path) -> np.ndarray:
    """Frame 0 of a video as uint8 [H, W, 3], decoded as osv.video.read_frames does (two frames read)."""
    from osv.video import decode, to_rgb

    return decode(path, until=0.0, convert=to_rgb)[1][0]
