"""Samplers against a Gaussian data distribution with closed-form denoiser and consistency function."""

import math

import pytest
import torch
from gaussian_closed_form import DT, GaussCond, assert_matches_gaussian, exact_consistency, gaussian_denoiser

from osv.samplers import consistency_sample, consistency_sigmas, guidance_ramp, teacher_sample, tts_sample
from osv.sde import Denoiser, karras_sigmas, precondition

N = 20000  # samples: standard error of a variance ~1%
T, C = 2, 2


def _data(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(1, T, C, 1, 1, generator=g, dtype=DT)
    s = torch.rand(1, T, C, 1, 1, generator=g, dtype=DT) + 0.5
    return mu, s, GaussCond(mu.expand(n, -1, -1, -1, -1))


def _shape(n=N):
    return (n, T, C, 1, 1)


def test_consistency_sigmas_evenly_spaced_from_the_top():
    sigmas = karras_sigmas(100, 0.002, 700.0, 7.0)
    assert torch.equal(consistency_sigmas(sigmas, 1), sigmas[[99]])
    assert torch.equal(consistency_sigmas(sigmas, 2), sigmas[[99, 49]])
    assert torch.equal(consistency_sigmas(sigmas, 4), sigmas[[99, 74, 49, 24]])
    assert torch.equal(consistency_sigmas(sigmas, 8), sigmas[[99 - 12 * i for i in range(8)]])
    with pytest.raises(ValueError, match="steps"):
        consistency_sigmas(sigmas, 0)


def test_teacher_sample_converges_to_the_data():
    mu, s, cond = _data()
    den = Denoiser.from_fn(gaussian_denoiser(s))
    out = teacher_sample(den, cond, _shape(), steps=1000, cfg=None, generator=torch.Generator().manual_seed(1), dtype=DT)
    assert out.nfe == 1000
    assert_matches_gaussian(out.latents, mu, s)


def _euler_contraction(steps, s, sigma_max=700.0):
    """Scalar product of Euler factors on the Gaussian PF-ODE over Karras(steps)+[0] (float32 sigmas)."""
    sig = karras_sigmas(steps, 0.002, sigma_max, 7.0).flip(0).to(torch.float32).tolist() + [0.0]
    a = torch.ones_like(s)
    for i in range(steps):
        a = a * (1 + (sig[i + 1] - sig[i]) * sig[i] / (s**2 + sig[i] ** 2))
    return a, sig[0]


@pytest.mark.parametrize("cfg", [None, 3.0])
def test_teacher_sample_25_steps_is_exact_euler_with_cfg_ramp(cfg):
    mu, s, cond = _data(64)
    den = Denoiser.from_fn(gaussian_denoiser(s))
    out = teacher_sample(den, cond, _shape(64), steps=25, cfg=cfg, generator=torch.Generator().manual_seed(2),
                         dtype=DT)
    eps = torch.randn(_shape(64), generator=torch.Generator().manual_seed(2), dtype=DT)
    a, sigma_top = _euler_contraction(25, s)
    w = 1.0 if cfg is None else torch.linspace(1.0, cfg, T, dtype=DT).reshape(1, T, 1, 1, 1)
    mu_w = w * mu  # the unconditional branch has mean 0: CFG is exact for N(w mu, s^2)
    expected = mu_w + a * (math.sqrt(sigma_top**2 + 1) * eps - mu_w)
    torch.testing.assert_close(out.latents, expected, rtol=1e-9, atol=1e-9)
    assert out.nfe == (25 if cfg is None else 50)


def test_teacher_cfg_one_runs_unguided_like_the_pipeline():
    mu, s, cond = _data(8)
    den = Denoiser.from_fn(gaussian_denoiser(s))
    assert teacher_sample(den, cond, _shape(8), steps=4, cfg=1.0, dtype=DT).nfe == 4
    assert teacher_sample(den, cond, _shape(8), steps=4, cfg=1.5, dtype=DT).nfe == 8
    assert guidance_ramp(3.0, 5).tolist() == pytest.approx([1.0, 1.5, 2.0, 2.5, 3.0])


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_consistency_sample_with_exact_consistency_fn(steps):
    mu, s, cond = _data()
    student = Denoiser.from_fn(exact_consistency(s))
    out = consistency_sample(student, cond, _shape(), steps=steps, generator=torch.Generator().manual_seed(steps),
                             dtype=DT)
    assert out.nfe == steps
    assert_matches_gaussian(out.latents, mu, s)


def test_consistency_sample_with_cfg_doubles_nfe_and_guides():
    mu, s, cond = _data()
    student = Denoiser.from_fn(exact_consistency(s))
    out = consistency_sample(student, cond, _shape(), steps=2, cfg=3.0, generator=torch.Generator().manual_seed(5),
                             dtype=DT)
    assert out.nfe == 4
    w = torch.linspace(1.0, 3.0, T, dtype=DT).reshape(1, T, 1, 1, 1)
    assert_matches_gaussian(out.latents, w * mu, s)


def _tts_reference(eps0, f_exact, s_max, s_mid, third_eval):
    """method.md §6 written out with plain tensors (F from f: F = (f - c_skip x) / c_out)."""

    def coeffs(sig):
        c_skip, c_out, _, _ = precondition(torch.tensor(sig, dtype=DT))
        return c_skip, c_out

    x = s_max * eps0
    f1 = f_exact(x, s_max)
    eps1 = (x - f1) / s_max
    xm = f1 + s_mid * (eps0 + eps1) / 2
    c_skip_mid, c_out_mid = coeffs(s_mid)
    f2 = f_exact(xm, s_mid)
    big_f2 = (f2 - c_skip_mid * xm) / c_out_mid
    eps2 = (xm - f2) / s_mid
    back = f2 + s_max * (eps0 + eps2) / 2
    if third_eval:
        return f_exact(back, s_max)
    c_skip_max, c_out_max = coeffs(s_max)
    return c_skip_max * back + c_out_max * big_f2


@pytest.mark.parametrize("third_eval", [False, True])
def test_tts_equals_the_method_formula_and_counts_nfe(third_eval):
    mu, s, _ = _data()
    f = exact_consistency(s)
    student = Denoiser.from_fn(f)
    out = tts_sample(student, GaussCond(mu.expand(64, -1, -1, -1, -1)), _shape(64),
                     generator=torch.Generator().manual_seed(3), third_eval=third_eval, dtype=DT)
    assert out.nfe == (3 if third_eval else 2)
    sig = karras_sigmas(100, 0.002, 700.0, 7.0).to(DT)
    eps0 = torch.randn(_shape(64), generator=torch.Generator().manual_seed(3), dtype=DT)
    ref = _tts_reference(eps0, lambda x, sg: f(x, sg, GaussCond(mu)), sig[99].item(), sig[49].item(), third_eval)
    torch.testing.assert_close(out.latents, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("third_eval", [False, True])
def test_tts_with_exact_consistency_fn_samples_unit_variance_data(third_eval):
    # With sigma_data = 1 (SVD's preconditioning assumption) TTS is near-exact: the std is
    # scaled by 0.9964 (NFE 2) / 0.9990 (NFE 3). For s far from 1 the F2-reuse reading is
    # biased (std x0.90 at s = 0.5, x1.09 at s = 2): TTS is a heuristic, not an exact sampler.
    mu, _, _ = _data()
    s = torch.ones_like(mu)
    student = Denoiser.from_fn(exact_consistency(s))
    out = tts_sample(student, GaussCond(mu.expand(N, -1, -1, -1, -1)), _shape(),
                     generator=torch.Generator().manual_seed(4), third_eval=third_eval, dtype=DT)
    assert_matches_gaussian(out.latents, mu, s)


def _bench_parser():
    import argparse

    from osv import bench

    parser = argparse.ArgumentParser(prog="osv")
    bench.register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_bench_sample_runs_and_reports(tmp_path, capsys):
    import json
    from pathlib import Path

    params = str(Path(__file__).resolve().parent.parent / "params.yaml")
    args = _bench_parser().parse_args(["bench", "sample", "--params", params, "--teacher-steps", "2",
                                       "--student-steps", "1,2", "--repeats", "1", "--warmup", "0",
                                       "--frames", "2", "--width", "32", "--height", "16",
                                       "--out", str(tmp_path / "bench.json")])
    assert args.func(args) == 0
    table = capsys.readouterr().out
    assert "RANDOM weights" in table and "student 1 step + TTS" in table and "speed-up" in table
    rows = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert [(r["steps"], r["nfe"]) for r in rows] == [(2, 4), (1, 1), (1, 2), (2, 2)]
    assert rows[0]["speedup"] == 1.0 and all(r["sec_per_video"] > 0 for r in rows)


def test_bench_missing_module_fails_only_its_own_subcommand(monkeypatch):
    from osv import bench

    monkeypatch.setattr(bench, "BENCHMARKS", bench.BENCHMARKS + [("ghost", "osv.no_such_bench", "missing")])
    parser = _bench_parser()
    assert parser.parse_args(["bench", "sample"]).benchmark == "sample"
    args = parser.parse_args(["bench", "ghost"])
    with pytest.raises(RuntimeError, match="osv.no_such_bench"):
        args.func(args)
