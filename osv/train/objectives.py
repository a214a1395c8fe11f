"""The objectives of both stages (method.md §3-4), one function each (as EDM's training/loss.py).

`lgp_targets` and `acd_targets` return (real, fake, distance per sample): the discriminator's real
and fake samples and the student's distance term; osv.train.distill.train_step turns them into one
D step and one G step. `ema_weights` and `ema_update` keep θ⁻, the network of the stage-2 target.

  LGP: n ~ U{0..N-1}, x = x0 + σ_n ε;  real = x0, fake = x̂ = f_θ(x, σ_n), distance d(x0, x̂).
  ACD: n ~ U{0..N-1-m}, x_{n+m} = x0 + σ_{n+m} ε; x̂_n = m Euler sub-steps of the CFG teacher;
       real = y = f_θ⁻(x̂_n, σ_n) (no grad), fake = ŷ = f_θ(x_{n+m}, σ_{n+m}), distance λ(σ_n)·d(y, ŷ).
Spec gaps as params: the teacher's w is the per-frame ramp cfg.min → cfg.max (acd.cfg.sampling = ramp)
or, per sample, cfg.min → w_end with w_end ~ U[cfg.min, cfg.max] (random, AnimateLCM-style); λ(σ_n)
uses the gap to the next grid sigma σ_{n+1} − σ_n (acd.weighting_gap = next, AnimateLCM's) or the
student's jump σ_{n+m} − σ_n (jump); the two agree for m = 1.
Noise and indices come from osv.train.loop's (seed, step, sample) generators, so resume is exact.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch

from osv.losses import distance_weight, pseudo_huber
from osv.samplers import guidance_ramp
from osv.solver import euler_solve, teacher_step_sigmas
from osv.train.loop import sample_rand, sample_randn, sample_uniform_int

if TYPE_CHECKING:
    from osv.train.distill import Nets


@contextlib.contextmanager
def ema_weights(nets: Nets):
    """Swap θ⁻ into the student's trainable parameters for the target forward (no grad)."""
    params, ema = list(nets.trainable.values()), [nets.ema[n] for n in nets.trainable]
    with torch.no_grad():
        backup = [p.detach().clone() for p in params]
        torch._foreach_copy_(params, ema)
    try:
        yield
    finally:
        with torch.no_grad():
            torch._foreach_copy_(params, backup)


def ema_update(nets: Nets, decay: float) -> None:
    """θ⁻ ← decay·θ⁻ + (1 − decay)·θ over the trainable parameters (fused: the same ops as a per-tensor
    mul_/add_ loop, so the same numbers)."""
    with torch.no_grad():
        ema = [nets.ema[n] for n in nets.trainable]
        torch._foreach_mul_(ema, decay)
        torch._foreach_add_(ema, [p.detach() for p in nets.trainable.values()], alpha=1 - decay)


def lgp_targets(nets: Nets, x0, cond, sigmas, params, step, slots, prec):
    """Stage 1: (real, fake, distance per sample) with real = x0 and fake = x̂ = f_θ(x0 + σ_n ε, σ_n)."""
    cfg, seed = params["lgp"], params["seed"]
    n = sample_uniform_int(len(sigmas), seed, step, slots).to(x0.device)
    sigma = sigmas[n]
    x = x0 + sigma.reshape(-1, 1, 1, 1, 1) * sample_randn(x0.shape[1:], seed, step, slots, device=x0.device)
    with prec.autocast():
        fake = nets.student_fn.consistency_fn(x, sigma, cond).float()
    distance = pseudo_huber(x0, fake, cfg["huber_c"], cfg["huber_mode"], reduce=False)
    return x0, fake, distance


def teacher_guidance(cfg: dict, frames: int, seed: int, step: int, slots) -> torch.Tensor:
    """The teacher's CFG w: the per-frame ramp min → max [T] (sampling = ramp), or per sample the ramp
    min → w_end [B, T] with w_end ~ U[min, max] from the sample's own "cfg" generator (sampling = random)."""
    lo, hi = cfg["min"], cfg["max"]
    if cfg["sampling"] == "ramp":
        return guidance_ramp(hi, frames, lo)
    w_end = lo + (hi - lo) * sample_rand(seed, step, slots, stream="cfg")
    return torch.stack([guidance_ramp(float(e), frames, lo) for e in w_end])


def acd_targets(nets: Nets, x0, cond, sigmas, params, step, slots, prec):
    """Stage 2: (real, fake, λ(σ_n)·distance per sample) with real = y = f_θ⁻(teacher solve), fake = ŷ."""
    cfg, seed, m = params["acd"], params["seed"], params["acd"]["m"]
    n = sample_uniform_int(len(sigmas) - m, seed, step, slots).to(x0.device)
    sigma_n, sigma_nm = sigmas[n], sigmas[n + m]
    x_nm = x0 + sigma_nm.reshape(-1, 1, 1, 1, 1) * sample_randn(x0.shape[1:], seed, step, slots, device=x0.device)
    w = teacher_guidance(cfg["cfg"], x0.shape[1], seed, step, slots).to(x0.device)
    with torch.no_grad(), prec.autocast():
        x_n = euler_solve(nets.teacher_fn, x_nm, teacher_step_sigmas(sigmas, n, m), cond,
                          w if float(w.max()) > 1 else None).float()
        with ema_weights(nets):
            real = nets.student_fn.consistency_fn(x_n, sigma_n, cond).float()
    with prec.autocast():
        fake = nets.student_fn.consistency_fn(x_nm, sigma_nm, cond).float()
    sigma_gap = sigmas[n + 1] if cfg["weighting_gap"] == "next" else sigma_nm
    weight = distance_weight(sigma_n, sigma_gap, cfg["weighting"]).to(fake)
    distance = weight * pseudo_huber(real, fake, cfg["huber_c"], cfg["huber_mode"], reduce=False)
    return real, fake, distance
