"""The teacher's ODE solver (method.md §4): Euler over given sigmas, with optional CFG."""

from __future__ import annotations

import torch

from osv.sde import Denoiser, _per_sample

Tensor = torch.Tensor


def teacher_step_sigmas(sigmas: Tensor, n, m: int) -> Tensor:
    """sigma_{n+m}, ..., sigma_n (descending, m + 1 values) from the ascending discretisation.

    `n` is an int or a LongTensor [B] of per-sample indices (then the result is [m + 1, B]).
    """
    n = torch.as_tensor(n, device=sigmas.device)
    if m < 1:
        raise ValueError(f"teacher_step_sigmas: m must be >= 1, got {m}")
    if int(n.min()) < 0 or int(n.max()) + m > len(sigmas) - 1:
        raise ValueError(f"teacher_step_sigmas: need 0 <= n and n + m <= {len(sigmas) - 1}, got n={n.tolist()}, m={m}")
    offsets = torch.arange(m, -1, -1, device=sigmas.device)
    index = n.unsqueeze(0) + offsets.reshape(-1, *([1] * n.ndim))
    return sigmas[index]


def euler_solve(denoiser: Denoiser, x: Tensor, sigmas_desc: Tensor, cond, cfg=None, progress: bool = False) -> Tensor:
    """Euler from sigmas_desc[0] down to sigmas_desc[-1]: x <- x + (s_next - s)(x - D^)/s.

    D^ is the guided denoiser when cfg (scalar, per-frame [T] or per-sample [B, T]) is given. sigmas_desc is [K]
    (shared) or [K, B] (per sample); a final 0 is allowed (that step returns D^).
    """
    from tqdm.auto import tqdm

    sigmas_desc = sigmas_desc.to(device=x.device, dtype=x.dtype)
    for i in tqdm(range(len(sigmas_desc) - 1), desc="euler", disable=not progress, leave=False):
        sigma, sigma_next = sigmas_desc[i], sigmas_desc[i + 1]
        denoised = denoiser.denoise(x, sigma, cond) if cfg is None else denoiser.guided(x, sigma, cond, cfg)
        derivative = (x - denoised) / _per_sample(sigma, x)
        x = x + derivative * _per_sample(sigma_next - sigma, x)
    return x
