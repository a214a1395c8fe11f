"""A Gaussian data distribution with closed-form denoiser, PF-ODE and consistency function (method.md §9)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

DT = torch.float64


@dataclass
class GaussCond:
    """Conditioning that selects the data mean; uncond() is the zero-mean branch (like SVD's c0)."""

    mu: torch.Tensor  # [B, T, C, 1, 1]

    def uncond(self) -> GaussCond:
        return GaussCond(torch.zeros_like(self.mu))

    @classmethod
    def cat(cls, conds):
        return cls(torch.cat([c.mu for c in conds]))


def _bc(sigma, x):
    sigma = torch.as_tensor(sigma, dtype=x.dtype)
    return sigma.reshape(-1, *([1] * (x.ndim - 1))) if sigma.ndim == 1 else sigma


def gaussian_denoiser(s: torch.Tensor):
    """D(x, sigma) = mu + s^2/(s^2+sigma^2) (x - mu) per dimension, mu from the conditioning."""

    def denoise(x, sigma, cond):
        sig = _bc(sigma, x)
        return cond.mu + s**2 / (s**2 + sig**2) * (x - cond.mu)

    return denoise


def ode_solution(x0, mu, s, sigma0, sigma1):
    """Exact PF-ODE transport of x0 at sigma0 to sigma1."""
    return mu + (x0 - mu) * torch.sqrt((s**2 + sigma1**2) / (s**2 + sigma0**2))


def exact_consistency(s: torch.Tensor, sigma_end: float = 0.0):
    """f(x, sigma): the exact ODE solution mapped to sigma_end (0 or sigma_min)."""

    def f(x, sigma, cond):
        return ode_solution(x, cond.mu, s, _bc(sigma, x), sigma_end)

    return f


def moments(samples: torch.Tensor):
    """Mean [d] and covariance [d, d] of samples [n, ...] flattened per sample."""
    flat = samples.reshape(samples.shape[0], -1)
    return flat.mean(0), torch.cov(flat.T)


def assert_matches_gaussian(samples, mu, std, z: float = 5.0):
    """Mean and covariance equal N(mu, diag(std^2)) within z standard errors."""
    n = samples.shape[0]
    mean, cov = moments(samples)
    mu, std = mu.reshape(-1).to(mean), std.reshape(-1).to(mean)
    assert torch.all((mean - mu).abs() < z * std / n**0.5), (mean, mu)
    var_err = (cov.diagonal() - std**2).abs() / (std**2 * (2 / n) ** 0.5)
    assert torch.all(var_err < z), (cov.diagonal(), std**2)
    off = cov - torch.diag(cov.diagonal())
    assert torch.all(off.abs() < z * torch.outer(std, std) / n**0.5), off
