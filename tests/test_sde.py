"""Schedule, preconditioning, Denoiser (CFG, NFE, boundary) and the Euler solver, against closed forms."""

import math

import numpy as np
import pytest
import torch
from gaussian_closed_form import DT, GaussCond, gaussian_denoiser, ode_solution

from osv.sde import Denoiser, boundary_coefficients, karras_sigmas, precondition
from osv.solver import euler_solve, teacher_step_sigmas


def test_karras_sigmas_ascending_and_equal_to_pipeline_scheduler():
    from diffusers import EulerDiscreteScheduler

    from osv.models import SVD_SCHEDULER

    sigmas = karras_sigmas(100, 0.002, 700.0, 7.0)
    assert len(sigmas) == 100 and torch.all(sigmas[1:] > sigmas[:-1])
    assert sigmas[0].item() == pytest.approx(0.002) and sigmas[-1].item() == pytest.approx(700.0)
    sched = EulerDiscreteScheduler(**SVD_SCHEDULER)
    sched.set_timesteps(25)
    ours = karras_sigmas(25, 0.002, 700.0, 7.0).flip(0).to(torch.float32)
    assert torch.equal(ours, sched.sigmas[:-1])
    assert karras_sigmas(1, 0.002, 700.0, 7.0).tolist() == [pytest.approx(700.0)]


def test_precondition_formulas_and_scheduler_denoised():
    sigma = torch.tensor([0.002, 0.5, 1.0, 80.0, 700.0], dtype=DT)
    c_skip, c_out, c_in, c_noise = precondition(sigma)
    torch.testing.assert_close(c_skip, 1 / (sigma**2 + 1))
    torch.testing.assert_close(c_out, -sigma / torch.sqrt(sigma**2 + 1))
    torch.testing.assert_close(c_in, 1 / torch.sqrt(sigma**2 + 1))
    torch.testing.assert_close(c_noise, 0.25 * torch.log(sigma))
    # v-prediction: the target v = (eps - sigma x0)/sqrt(sigma^2+1) makes D = c_skip x + c_out v = x0
    x0, eps = torch.randn(5, dtype=DT), torch.randn(5, dtype=DT)
    x = x0 + sigma * eps
    v = (eps - sigma * x0) / torch.sqrt(sigma**2 + 1)
    torch.testing.assert_close(c_skip * x + c_out * v, x0)


def test_exact_boundary_coefficients():
    c_skip, c_out = boundary_coefficients(0.002, 0.002)
    assert c_skip.item() == 1.0 and c_out.item() == 0.0
    sk, so, _, _ = precondition(50.0)
    bk, bo = boundary_coefficients(50.0, 0.002)
    assert bk.item() == pytest.approx(sk.item(), rel=1e-3) and bo.item() == pytest.approx(so.item(), rel=1e-4)


def _gauss(batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(1, 2, 2, 1, 1, generator=g, dtype=DT)
    s = torch.rand(1, 2, 2, 1, 1, generator=g, dtype=DT) + 0.5
    return mu, s, GaussCond(mu.expand(batch, -1, -1, -1, -1).clone())


def test_closed_form_denoiser_roundtrip_and_nfe():
    mu, s, cond = _gauss()
    den = Denoiser.from_fn(gaussian_denoiser(s))
    x = torch.randn(4, 2, 2, 1, 1, dtype=DT) * 3
    sigma = torch.tensor([0.1, 1.0, 10.0, 300.0], dtype=DT)  # per-sample sigmas
    expected = gaussian_denoiser(s)(x, sigma, cond)
    torch.testing.assert_close(den.denoise(x, sigma, cond), expected)
    torch.testing.assert_close(den.consistency_fn(x, sigma, cond), expected)
    assert den.nfe == 2


def test_guided_is_linear_cfg_with_per_frame_scale_and_counts_two():
    mu, s, cond = _gauss()
    den = Denoiser.from_fn(gaussian_denoiser(s))
    x = torch.randn(4, 2, 2, 1, 1, dtype=DT)
    w = torch.tensor([1.0, 3.0], dtype=DT)  # per frame
    d_c, d_0 = den.denoise(x, 2.0, cond), den.denoise(x, 2.0, cond.uncond())
    den.nfe = 0
    guided = den.guided(x, 2.0, cond, w)
    assert den.nfe == 2
    torch.testing.assert_close(guided, d_0 + w.reshape(1, 2, 1, 1, 1) * (d_c - d_0))
    torch.testing.assert_close(den.guided(x, 2.0, cond, 2.5), d_0 + 2.5 * (d_c - d_0))


def test_consistency_boundary_approx_and_exact():
    mu, s, cond = _gauss()
    x = torch.randn(4, 2, 2, 1, 1, dtype=DT)
    approx = Denoiser.from_fn(gaussian_denoiser(s)).consistency_fn(x, 0.002, cond)
    assert (approx - x).abs().max() < 1e-4  # f(x, sigma_min) ~ x (AnimateLCM's approximate boundary)
    exact = Denoiser.from_fn(gaussian_denoiser(s), boundary="exact", sigma_min=0.002)
    torch.testing.assert_close(exact.consistency_fn(x, 0.002, cond), x, rtol=0, atol=1e-15)


def test_exact_boundary_with_a_real_unet():
    from osv.conditioning import SVDConditioning, make_added_time_ids
    from osv.models import build_small_unet

    unet = build_small_unet(num_frames=2).eval()
    cond = SVDConditioning(torch.randn(1, 1, 64), torch.randn(1, 4, 8, 8), make_added_time_ids(7, 127, 0.02, 1))
    x = torch.randn(1, 2, 4, 8, 8)
    with torch.no_grad():
        out = Denoiser(unet, boundary="exact", sigma_min=0.002).consistency_fn(x, 0.002, cond)
    torch.testing.assert_close(out, x, rtol=0, atol=0)


def test_teacher_step_sigmas():
    sigmas = karras_sigmas(100, 0.002, 700.0, 7.0)
    sub = teacher_step_sigmas(sigmas, 10, 5)
    assert torch.equal(sub, sigmas[[15, 14, 13, 12, 11, 10]])
    per_sample = teacher_step_sigmas(sigmas, torch.tensor([0, 94]), 5)
    assert per_sample.shape == (6, 2) and torch.equal(per_sample[:, 1], sigmas[[99, 98, 97, 96, 95, 94]])
    with pytest.raises(ValueError, match="n \\+ m"):
        teacher_step_sigmas(sigmas, 95, 5)


def test_euler_per_sample_sigmas_equal_separate_solves():
    mu, s, cond = _gauss(batch=2)
    den = Denoiser.from_fn(gaussian_denoiser(s))
    sigmas = karras_sigmas(100, 0.002, 700.0, 7.0).to(DT)
    x = torch.randn(2, 2, 2, 1, 1, dtype=DT) * 5
    n = torch.tensor([30, 60])
    both = euler_solve(den, x, teacher_step_sigmas(sigmas, n, 5), cond)
    for b in range(2):
        one = euler_solve(den, x[b : b + 1], teacher_step_sigmas(sigmas, int(n[b]), 5), GaussCond(cond.mu[b : b + 1]))
        torch.testing.assert_close(both[b : b + 1], one)


def test_euler_is_first_order_against_exact_pf_ode():
    mu, s, cond = _gauss(batch=64)
    den = Denoiser.from_fn(gaussian_denoiser(s))
    sigma0, sigma1 = 20.0, 0.3
    x0 = mu + torch.randn(64, 2, 2, 1, 1, dtype=DT, generator=torch.Generator().manual_seed(1)) * math.hypot(1, sigma0)
    exact = ode_solution(x0, mu, s, sigma0, sigma1)
    steps = [8, 16, 32, 64, 128, 256]
    errors = []
    for k in steps:
        grid = torch.linspace(sigma0, sigma1, k + 1, dtype=DT)
        errors.append((euler_solve(den, x0, grid, cond) - exact).abs().max().item())
    slope = np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert -1.2 < slope < -0.8, (slope, errors)
    # CFG in the solver: w = 1 everywhere is the conditional ODE, at 2 NFE per step
    den.nfe = 0
    guided = euler_solve(den, x0, torch.linspace(sigma0, sigma1, 9, dtype=DT), cond, cfg=1.0)
    torch.testing.assert_close(guided, euler_solve(den, x0, torch.linspace(sigma0, sigma1, 9, dtype=DT), cond))
    assert den.nfe == 2 * 8 + 8


def test_conditioning_time_ids_uncond_and_from_batch():
    from osv.conditioning import SVDConditioning, from_batch, make_added_time_ids

    ids = make_added_time_ids(7, 127, 0.02, 2)
    assert ids.shape == (2, 3) and ids[0].tolist() == pytest.approx([6.0, 127.0, 0.02])  # fps - 1, as the pipeline
    params = {"data": {"fps": 7}, "conditioning": {"motion_bucket_id": 127, "noise_aug_strength": 0.02}}
    # one LatentDataset item (not collated): image_embeds [1, D], cond_latents [4, h, w]
    item = {"image_embeds": torch.randn(1, 64), "cond_latents": torch.randn(4, 8, 16), "latents": torch.randn(8, 4, 8, 16)}
    one = from_batch(item, params)
    assert one.image_embeds.shape == (1, 1, 64) and one.cond_latents.shape == (1, 4, 8, 16)
    both = SVDConditioning.cat([one, one.uncond()])
    assert both.batch_size == 2 and torch.all(both.image_embeds[1] == 0) and torch.all(both.cond_latents[1] == 0)
    assert torch.equal(both.added_time_ids[0], both.added_time_ids[1])
    with pytest.raises(KeyError, match="cond_latents"):
        from_batch({"image_embeds": torch.randn(1, 1, 64)}, params)
