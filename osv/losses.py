"""Losses of both stages (method.md §2-4): hinge GAN losses, pseudo-Huber distance, lambda(sigma).

Logits are [B, K] (every head position of the discriminator); the hinge means
average over the batch and all K positions, i.e. over heads and positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GENERATOR_LOSSES = ("hinge", "neg")
HUBER_MODES = ("elementwise", "norm")
WEIGHTINGS = ("animatelcm", "ict", "uniform")


def d_hinge_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """mean ReLU(1 - D(real)) + mean ReLU(1 + D(fake)) [paper]."""
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def g_loss(fake_logits: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """Generator term: mean ReLU(1 - D(fake)) (hinge, the paper's) or -mean D(fake) (neg)."""
    if kind == "hinge":
        return F.relu(1.0 - fake_logits).mean()
    if kind == "neg":
        return -fake_logits.mean()
    raise ValueError(f"generator_loss must be one of {GENERATOR_LOSSES}, got {kind!r}")


def pseudo_huber(x: torch.Tensor, y: torch.Tensor, c: float = 0.001, mode: str = "elementwise",
                 reduce: bool = True) -> torch.Tensor:
    """d(x, y) = sqrt(||x - y||^2 + c^2) - c.

    elementwise (AnimateLCM): applied per element, averaged over each sample;
    norm (the paper's formula): on each sample's whole-tensor L2 norm.
    reduce=False returns the per-sample values [B] (for a per-sample lambda(sigma)),
    reduce=True their batch mean.
    """
    if x.shape != y.shape:
        raise ValueError(f"pseudo_huber: shapes differ {tuple(x.shape)} vs {tuple(y.shape)}")
    diff = (x - y).float().flatten(1)
    if mode == "elementwise":
        per_sample = (torch.sqrt(diff.square() + c * c) - c).mean(dim=1)
    elif mode == "norm":
        per_sample = torch.sqrt(diff.square().sum(dim=1) + c * c) - c
    else:
        raise ValueError(f"huber_mode must be one of {HUBER_MODES}, got {mode!r}")
    return per_sample.mean() if reduce else per_sample


def distance_weight(sigma_n, sigma_next, kind: str = "animatelcm"):
    """lambda(sigma_n) of the stage-2 distance term.

    sigma_next is the noisier neighbour sigma_{n+1} > sigma_n (ascending index,
    as osv.sde.karras_sigmas), so the gap sigma_{n+1} - sigma_n is positive:
    animatelcm = (1 / gap)^0.1 (AnimateLCM writes sigma_n - sigma_{n+1} in its
    descending indexing: the same gap), ict = 1 / gap, uniform = 1.
    """
    out_dtype = sigma_n.dtype if torch.is_tensor(sigma_n) and sigma_n.is_floating_point() else torch.float32
    # the gap near sigma_min is ~1e-5: subtract in float64, return in the caller's dtype
    gap = torch.as_tensor(sigma_next, dtype=torch.float64) - torch.as_tensor(sigma_n, dtype=torch.float64)
    if kind == "uniform":
        weight = torch.ones_like(gap)
    elif kind not in WEIGHTINGS:
        raise ValueError(f"acd.weighting must be one of {WEIGHTINGS}, got {kind!r}")
    elif bool((gap <= 0).any()):
        raise ValueError(f"distance_weight: sigma_next must exceed sigma_n, got gaps {gap.tolist()}")
    elif kind == "animatelcm":
        weight = (1.0 / gap) ** 0.1
    else:
        weight = 1.0 / gap
    return weight.to(out_dtype)
