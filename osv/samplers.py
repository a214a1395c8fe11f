"""Samplers (method.md §6): the SVD teacher, the consistency multistep student and the Time Travel Sampler.

All return SampleResult(latents, nfe); nfe is read off the Denoiser's counter (network
evaluations per video, CFG counting 2), never computed by formula.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from osv.sde import Denoiser, karras_sigmas
from osv.solver import euler_solve

Tensor = torch.Tensor


@dataclass
class SampleResult:
    latents: Tensor  # [B, T, 4, h, w], in the scaled latent space of the VAE
    nfe: int


def _randn(shape, generator, device, dtype) -> Tensor:
    from diffusers.utils.torch_utils import randn_tensor  # the pipeline's generator use

    return randn_tensor(tuple(shape), generator=generator, device=torch.device(device), dtype=dtype)


def guidance_ramp(cfg, frames: int, cfg_min: float = 1.0):
    """SVD's per-frame guidance: linspace(cfg_min, cfg, T); a tensor is used as given; None stays None."""
    if cfg is None or isinstance(cfg, Tensor):
        return cfg
    return torch.linspace(cfg_min, float(cfg), frames)


def consistency_sigmas(sigmas: Tensor, steps: int) -> Tensor:
    """The k-step sub-schedule (descending) of the N ascending sigmas, LCM/AnimateLCM style:
    indices N-1, N-1-s, ..., N-1-(k-1)s with s = N // k (evenly spaced from the top)."""
    n = len(sigmas)
    if not 1 <= steps <= n:
        raise ValueError(f"consistency_sigmas: steps must be in 1..{n} (num_sigmas), got {steps}")
    return sigmas[[n - 1 - i * (n // steps) for i in range(steps)]]


@torch.no_grad()
def teacher_sample(denoiser: Denoiser, cond, shape, steps: int = 25, cfg=3.0, generator=None,
                   sigma_min: float = 0.002, sigma_max: float = 700.0, rho: float = 7.0, cfg_min: float = 1.0,
                   init_noise: str = "pipeline", dtype=torch.float32, progress: bool = False) -> SampleResult:
    """EDM Euler over Karras(steps) + [0] with the per-frame CFG ramp cfg_min -> cfg (SVD pipeline).

    Reproduces StableVideoDiffusionPipeline(output_type="latent"): like it, CFG is skipped
    (1 NFE/step) when the ramp never exceeds 1, and init_noise="pipeline" scales the initial
    noise by sqrt(sigma_max^2 + 1) (EulerDiscreteScheduler's init_noise_sigma for "leading"
    spacing); "edm" uses sigma_max. shape = (B, T, 4, h, w).
    """
    if init_noise not in ("pipeline", "edm"):
        raise ValueError(f"teacher_sample: init_noise must be 'pipeline' or 'edm', got {init_noise!r}")
    device = cond.cond_latents.device if hasattr(cond, "cond_latents") else "cpu"
    sigmas = karras_sigmas(steps, sigma_min, sigma_max, rho).flip(0).to(torch.float32)
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)]).to(dtype)
    scale = (sigmas[0] ** 2 + 1) ** 0.5 if init_noise == "pipeline" else sigmas[0]
    x = _randn(shape, generator, device, dtype) * scale.to(device)
    w = guidance_ramp(cfg, shape[1], cfg_min)
    if w is not None and float(torch.as_tensor(w).max()) <= 1:
        w = None
    start = denoiser.nfe
    x = euler_solve(denoiser, x, sigmas, cond, w, progress=progress)
    return SampleResult(x, denoiser.nfe - start)


@torch.no_grad()
def consistency_sample(denoiser: Denoiser, cond, shape, steps: int = 1, cfg=None, generator=None,
                       num_sigmas: int = 100, sigma_min: float = 0.002, sigma_max: float = 700.0,
                       rho: float = 7.0, cfg_min: float = 1.0, dtype=torch.float32) -> SampleResult:
    """Consistency multistep sampling: x <- sigma_max eps; x0^ = f(x, s_i); x <- x0^ + s_{i+1} eps'.

    The k sigmas come from `consistency_sigmas` over Karras(num_sigmas). `cfg` (ablation f)
    guides each consistency call (2 NFE per step); the paper samples the student without it.
    """
    device = cond.cond_latents.device if hasattr(cond, "cond_latents") else "cpu"
    schedule = consistency_sigmas(karras_sigmas(num_sigmas, sigma_min, sigma_max, rho), steps).to(dtype)
    w = guidance_ramp(cfg, shape[1], cfg_min)
    start = denoiser.nfe
    x = schedule[0].to(device) * _randn(shape, generator, device, dtype)
    for i, sigma in enumerate(schedule):
        x0 = denoiser.consistency_fn(x, sigma, cond, w)
        if i + 1 < len(schedule):
            x = x0 + schedule[i + 1].to(device) * _randn(shape, generator, device, dtype)
    return SampleResult(x0, denoiser.nfe - start)


@torch.no_grad()
def tts_sample(denoiser: Denoiser, cond, shape, generator=None, third_eval: bool = False,
               num_sigmas: int = 100, sigma_min: float = 0.002, sigma_max: float = 700.0, rho: float = 7.0,
               dtype=torch.float32) -> SampleResult:
    """Time Travel Sampler, 1 step (method.md §6, reconstructed). NFE 2; third_eval=True
    evaluates f(x^, sigma_max) at the travelled-back point instead of reusing F2 (NFE 3).

    sigma_mid is the second sigma of the 2-step consistency schedule.
    """
    device = cond.cond_latents.device if hasattr(cond, "cond_latents") else "cpu"
    s_max, s_mid = consistency_sigmas(karras_sigmas(num_sigmas, sigma_min, sigma_max, rho), 2).to(dtype).to(device)
    start = denoiser.nfe
    eps0 = _randn(shape, generator, device, dtype)
    x = s_max * eps0
    f1 = denoiser.consistency_fn(x, s_max, cond)
    eps1 = (x - f1) / s_max
    x_mid = f1 + s_mid * (eps0 + eps1) / 2
    out2 = denoiser.raw(x_mid, s_mid, cond)
    f2 = denoiser.combine(x_mid, s_mid, out2, consistency=True)
    eps2 = (x_mid - f2) / s_mid
    x_back = f2 + s_max * (eps0 + eps2) / 2
    if third_eval:
        result = denoiser.consistency_fn(x_back, s_max, cond)
    else:
        c_skip, c_out = denoiser.coefficients(s_max, x_back, consistency=True)
        result = c_skip * x_back + c_out * out2  # F2 reused: the NFE-2 reading
    return SampleResult(result, denoiser.nfe - start)


@torch.no_grad()
def decode_latents(vae, latents: Tensor, chunk: int | None = None) -> Tensor:
    """Scaled latents [B, T, 4, h, w] -> frames [B, T, 3, H, W] in [-1, 1], decoded `chunk` frames
    at a time (StableVideoDiffusionPipeline.decode_latents; chunk None = all frames at once)."""
    b, t = latents.shape[:2]
    flat = latents.flatten(0, 1).to(vae.dtype) / vae.config.scaling_factor
    chunk = chunk or flat.shape[0]
    frames = [vae.decode(flat[i : i + chunk], num_frames=len(flat[i : i + chunk])).sample
              for i in range(0, flat.shape[0], chunk)]
    return torch.cat(frames).float().reshape(b, t, *frames[0].shape[1:])
