"""EDM noise schedule and SVD's v-prediction preconditioning (method.md §2).

x_sigma = x0 + sigma * eps. The network F sees c_in(sigma) * x and c_noise(sigma); the
denoiser is D(x, sigma) = c_skip(sigma) * x + c_out(sigma) * F. In SVD's parametrisation the
consistency function f_theta is the same expression (AnimateLCM), so f(x, sigma_min) is x
only approximately; `Denoiser(boundary="exact")` shifts c_skip/c_out so it holds exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

Tensor = torch.Tensor


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float) -> Tensor:
    """N Karras sigmas, ascending: sigmas[0] = sigma_min, sigmas[n-1] = sigma_max (float64).

    Computed exactly as diffusers' EulerDiscreteScheduler._convert_to_karras (descending
    in float64, then flipped), so a float32 cast gives the pipeline's sigmas bit for bit.
    n = 1 gives [sigma_max] (the pipeline's 1-step schedule).
    """
    if n < 1:
        raise ValueError(f"karras_sigmas: n must be >= 1, got {n}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"karras_sigmas: need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    ramp = np.linspace(0, 1, n)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    desc = (max_inv + ramp * (min_inv - max_inv)) ** rho
    return torch.from_numpy(desc[::-1].copy())


def _as_float(sigma) -> Tensor:
    """Tensors keep their float dtype; Python numbers and integer tensors become float64."""
    if isinstance(sigma, Tensor) and sigma.is_floating_point():
        return sigma
    return torch.as_tensor(sigma, dtype=torch.float64)


def precondition(sigma) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """SVD (EDM, sigma_data = 1, v-prediction) coefficients (c_skip, c_out, c_in, c_noise)."""
    sigma = _as_float(sigma)
    s2 = sigma**2 + 1
    return 1 / s2, -sigma / s2.sqrt(), 1 / s2.sqrt(), 0.25 * sigma.log()


def boundary_coefficients(sigma, sigma_min: float) -> tuple[Tensor, Tensor]:
    """Exact-boundary (c_skip, c_out) of the consistency function.

    c_skip = 1 / ((sigma - sigma_min)^2 + 1),  c_out = -(sigma - sigma_min) / sqrt(sigma^2 + 1):
    the consistency-model form (Song et al. 2023, sigma_data = 1) with SVD's v-prediction sign.
    At sigma_min: c_skip = 1, c_out = 0, so f(x, sigma_min) = x exactly; for sigma >> sigma_min
    they equal SVD's coefficients, so the teacher's F is a good initialisation.
    """
    sigma = _as_float(sigma)
    shifted = sigma - sigma_min
    return 1 / (shifted**2 + 1), -shifted / (sigma**2 + 1).sqrt()


def _per_sample(c: Tensor, x: Tensor) -> Tensor:
    """Shape a scalar or per-sample [B] coefficient to broadcast against x [B, ...]."""
    c = c.to(device=x.device, dtype=x.dtype)
    return c.reshape(-1, *([1] * (x.ndim - 1))) if c.ndim == 1 else c


def _guidance(cfg, x: Tensor) -> Tensor:
    """Scalar or per-frame [T] (or [B, T]) guidance, broadcast against x [B, T, C, h, w]."""
    w = torch.as_tensor(cfg, dtype=x.dtype, device=x.device)
    if w.ndim == 1:
        w = w.reshape(1, -1)
    return w.reshape(*w.shape, *([1] * (x.ndim - w.ndim))) if w.ndim else w


def unet_network(unet) -> Callable:
    """F(x_in, c_noise, cond) for diffusers' UNetSpatioTemporalConditionModel (SVD).

    The conditioning latent is concatenated channel-wise to every frame (4 + 4 channels),
    exactly as StableVideoDiffusionPipeline does.
    """

    def network(x_in: Tensor, c_noise: Tensor, cond) -> Tensor:
        dtype = unet.dtype
        cond_frames = cond.cond_latents.unsqueeze(1).expand(-1, x_in.shape[1], -1, -1, -1)
        sample = torch.cat([x_in.to(dtype), cond_frames.to(device=x_in.device, dtype=dtype)], dim=2)
        return unet(sample, c_noise.to(x_in.device), encoder_hidden_states=cond.image_embeds.to(dtype),
                    added_time_ids=cond.added_time_ids.to(dtype), return_dict=False)[0]

    return network


class Denoiser:
    """D, f_theta and CFG around a network F(x_in, c_noise, cond) (method.md §2, §4).

    `network` is an SVD UNet (wrapped by `unet_network`) or any callable F(x_in, c_noise, cond).
    `nfe` counts network evaluations per sample batch: a CFG call (`cfg` given) costs 2,
    as the paper counts it (the two branches run as one 2B batch, like the pipeline).
    `boundary="exact"` makes consistency_fn use `boundary_coefficients` (f(x, sigma_min) = x).
    """

    def __init__(self, network, boundary: str = "approx", sigma_min: float = 0.002):
        if boundary not in ("approx", "exact"):
            raise ValueError(f"Denoiser: boundary must be 'approx' or 'exact', got {boundary!r}")
        self.network = unet_network(network) if isinstance(network, torch.nn.Module) else network
        self.module = network if isinstance(network, torch.nn.Module) else None
        self.boundary, self.sigma_min, self.nfe = boundary, sigma_min, 0

    @classmethod
    def from_fn(cls, denoise_fn: Callable, **kwargs) -> Denoiser:
        """A Denoiser from a closed-form D(x, sigma, cond) (tests); F is recovered from D."""
        return _ClosedFormDenoiser(denoise_fn, **kwargs)

    def _evaluate(self, x: Tensor, sigma: Tensor, cond) -> Tensor:
        """One (possibly batched) network evaluation F at the unscaled point x."""
        _, _, c_in, c_noise = precondition(sigma)
        out = self.network(_per_sample(c_in, x) * x, c_noise, cond)
        return out.to(x.dtype)

    def _sigma(self, sigma, x: Tensor) -> Tensor:
        """sigma as a tensor in x's dtype (Python numbers converted directly, not through float32)."""
        return torch.as_tensor(sigma, device=x.device, dtype=x.dtype)

    def raw(self, x: Tensor, sigma, cond, cfg=None) -> Tensor:
        """Network output F (guided F0 + w (F - F0) when cfg is given); counts NFE."""
        sigma = self._sigma(sigma, x)
        if cfg is None:
            self.nfe += 1
            return self._evaluate(x, sigma, cond)
        self.nfe += 2
        both_sigma = torch.cat([sigma, sigma]) if sigma.ndim == 1 else sigma
        both = self._evaluate(torch.cat([x, x]), both_sigma, type(cond).cat([cond.uncond(), cond]))
        f_uncond, f_cond = both.chunk(2)
        return f_uncond + _guidance(cfg, x) * (f_cond - f_uncond)

    def coefficients(self, sigma, x: Tensor, consistency: bool = False) -> tuple[Tensor, Tensor]:
        """(c_skip, c_out) shaped for x; the boundary variant only for the consistency function."""
        sigma = self._sigma(sigma, x)
        if consistency and self.boundary == "exact":
            c_skip, c_out = boundary_coefficients(sigma, self.sigma_min)
        else:
            c_skip, c_out, _, _ = precondition(sigma)
        return _per_sample(c_skip, x), _per_sample(c_out, x)

    def combine(self, x: Tensor, sigma, out: Tensor, consistency: bool = False) -> Tensor:
        """c_skip x + c_out F for a network output F computed earlier (TTS reuses F)."""
        c_skip, c_out = self.coefficients(sigma, x, consistency)
        return c_skip * x + c_out * out

    def denoise(self, x: Tensor, sigma, cond) -> Tensor:
        """D(x, sigma) for x [B, T, 4, h, w], sigma scalar or [B]."""
        return self.combine(x, sigma, self.raw(x, sigma, cond))

    def guided(self, x: Tensor, sigma, cond, cfg) -> Tensor:
        """D(c0) + w (D(c) - D(c0)), w scalar, per-frame [T] or per-sample [B, T]; c0 = cond.uncond(). 2 NFE."""
        return self.combine(x, sigma, self.raw(x, sigma, cond, cfg))

    def consistency_fn(self, x: Tensor, sigma, cond, cfg=None) -> Tensor:
        """f_theta(x, sigma); with cfg, the guided call of ablation (f) (2 NFE)."""
        return self.combine(x, sigma, self.raw(x, sigma, cond, cfg), consistency=True)


class _ClosedFormDenoiser(Denoiser):
    """`network` is a closed-form D(x, sigma, cond); F = (D - c_skip x) / c_out keeps every method exact."""

    def _evaluate(self, x: Tensor, sigma: Tensor, cond) -> Tensor:
        c_skip, c_out, _, _ = precondition(sigma)
        c_skip, c_out = _per_sample(c_skip, x), _per_sample(c_out, x)
        return (self.network(x, sigma, cond) - c_skip * x) / c_out
