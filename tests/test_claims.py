"""`osv experiment claims`: the exact miniature teacher, the distance, the verdicts, and the stage end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from osv.experiments import claims as C
from osv.experiments import verdicts as V
from osv.params import deep_merge, validate

REPO = Path(__file__).resolve().parent.parent
T, CH = C.FRAMES, C.CHANNELS


def params(**claims) -> dict:
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    return validate(deep_merge(base, {"claims": claims}))


def brute_force_denoiser(mix, x, sigma, c, conditional):
    """E[x0 | x] by the textbook formula for each full-covariance component (flatten order [T, C])."""
    d = T * CH
    u = torch.zeros(d, CH, dtype=torch.float64)
    for ch in range(CH):
        u[ch::CH, ch] = 1.0
    logs, means = [], []
    for k in range(len(mix.weights)):
        mu = mix.motions[k].flatten() + (c if conditional else mix.hints[k]).repeat(T)
        cov = mix.stds[k] ** 2 * torch.eye(d, dtype=torch.float64) + (0 if conditional else u @ u.T)
        noisy = cov + sigma**2 * torch.eye(d, dtype=torch.float64)
        prior = mix.weights[k].log() - (0.5 * ((c - mix.hints[k]) ** 2).sum() if conditional else 0)  # p(k | c)
        logs.append(prior + torch.distributions.MultivariateNormal(mu, noisy).log_prob(x))
        means.append(mu + cov @ torch.linalg.solve(noisy, x - mu))
    w = torch.softmax(torch.stack(logs), 0)
    return (w[:, None] * torch.stack(means)).sum(0)


@pytest.mark.parametrize("sigma", [0.01, 0.5, 3.0, 50.0])
@pytest.mark.parametrize("conditional", [True, False])
def test_teacher_is_the_exact_denoiser_of_both_cfg_branches(sigma, conditional):
    mix, g = C.MotionMixture(), torch.Generator().manual_seed(int(sigma * 100))
    x = torch.randn(T * CH, generator=g, dtype=torch.float64) * (1 + sigma)
    c = torch.randn(CH, generator=g, dtype=torch.float64)
    cond = C.conditioning(c.reshape(1, CH, 1, 1))
    cond = cond if conditional else cond.uncond()
    ours = mix.denoise(x.reshape(1, T, CH, 1, 1), torch.tensor([sigma], dtype=torch.float64), cond).flatten()
    assert torch.allclose(ours, brute_force_denoiser(mix, x, sigma, c, conditional), atol=1e-12)


def test_samples_follow_the_generative_story():
    mix, g = C.MotionMixture(), torch.Generator().manual_seed(0)
    c, x = mix.sample(40_000, g)
    c, x = c.double().flatten(1), x.double().reshape(-1, T, CH)
    assert torch.allclose(c.mean(0), (mix.weights[:, None] * mix.hints).sum(0), atol=0.02)
    assert torch.allclose(x.mean(0), c.mean(0) + (mix.weights[:, None, None] * mix.motions).sum(0), atol=0.03)
    assert (x[:, 0] - c).std() < 0.25  # frame 0 is the first frame plus the component's small noise


def test_energy_distance_is_zero_for_one_distribution_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(0)
    same = [C.energy_distance(torch.randn(256, 4, generator=g), torch.randn(256, 4, generator=g)) for _ in range(20)]
    assert abs(sum(same) / len(same)) < 0.01
    shifted = C.energy_distance(torch.randn(256, 4, generator=g), torch.randn(256, 4, generator=g) + 0.5)
    assert shifted > 0.2
    with pytest.raises(ValueError, match="equal sizes"):
        C.energy_distance(torch.zeros(3, 2), torch.zeros(4, 2))


def test_claims_compare_worse_minus_better_with_a_t_interval():
    per_seed = [{a: 1.0 for a in V.ARMS} for _ in range(4)]
    for i, d in enumerate(per_seed):
        d.update(osv_tts=0.2 + 0.01 * i, m1_tts=0.5 + 0.02 * i, no_adv_tts=0.1,
                 stage1_only_tts=0.2 + 0.01 * i + (0.05 if i % 2 else -0.05))
    curves = [{run: [(10, 1.0), (20, 0.5)] for run in V.CURVE_RUNS} for _ in per_seed]
    out = V.summarise(per_seed, curves, 0.95)
    m = out["claims"]["T2a-m"]  # m1_tts − osv_tts = 0.3 + 0.01 i > 0: the paper's direction
    assert m["difference"] == pytest.approx(0.315) and m["low"] > 0 and m["verdict"] == "reproduced"
    assert out["claims"]["T2d-adv"]["verdict"] == "not reproduced"  # no_adv_tts is the better one here
    assert out["claims"]["T2c-stage2"]["verdict"] == "inconclusive"  # ±0.05 around 0
    assert out["arms"]["osv_tts"]["low"] < 0.215 < out["arms"]["osv_tts"]["high"]
    assert [r["iteration"] for r in out["curves"] if r["run"] == "osv"] == [10, 20]
    assert V.verdict(0.1, 0.2) == "reproduced" and V.verdict(-0.2, -0.1) == "not reproduced"
    assert V.verdict(-0.1, 0.1) == "inconclusive"


def stage2_distance(p, steps):
    """1-step distance to the guided target of the EMA student after `steps` stage-2 iterations from the teacher."""
    mix, sde = C.MotionMixture(), p["sde"]
    sigmas = C.karras_sigmas(p["claims"]["num_sigmas"], sde["sigma_min"], sde["sigma_max"], sde["rho"]).float()
    trained = C.train_run(p, mix, sigmas, "acd", steps, 0, None, {"lambda_adv": 0.0})
    evaluate = C.Evaluator(p, mix, 0)
    return evaluate(C.ema_denoiser(mix, trained.residual, trained.ema, sde["sigma_min"], "approx"))


def test_stage2_through_train_step_moves_the_one_step_student_onto_the_guided_target():
    """The package's own ACD step from student = teacher (whose 1-step sample is a blurred posterior mean):
    1,000 iterations bring the EMA student's 1-step sample to the guided teacher's distribution."""
    torch.set_num_threads(1)
    guided = params(eval_points=256, reference_steps=100)
    start, after = stage2_distance(guided, 1), stage2_distance(guided, 1000)
    assert after < 0.25 * start, (start, after)


def test_the_stage_writes_metrics_provenance_curves_and_a_verdict_per_claim(tmp_path):
    p = params(seeds=2, stage1_steps=10, stage2_steps=40, eval_points=64, eval_every=20, reference_steps=50)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    out = subprocess.run([sys.executable, "-m", "osv.cli", "experiment", "claims", "--params", "params.yaml",
                          "--out", "metrics/claims.json", "--plot", "reports/claims_curves.png",
                          "--csv", "plots/claims.csv"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    numbers = json.loads((tmp_path / "metrics/claims.json").read_text())
    prov = json.loads((tmp_path / "metrics/claims.provenance.json").read_text())
    assert set(numbers["claims"]) == {c[0] for c in V.CLAIMS} and set(numbers["arms"]) == set(V.ARMS)
    assert {v["verdict"] for v in prov["results"]["claims"].values()} <= {"reproduced", "not reproduced",
                                                                          "inconclusive"}
    assert "not SVD" in prov["weights"] and prov["results"]["protocol"]["seeds"] == [0, 1]
    assert isinstance(prov["timing"]["wall_s"], float)
    per_seed = prov["results"]["per_seed"]
    assert all(t25 < t1 for t25, t1 in zip(per_seed["teacher_25"], per_seed["teacher_1"]))  # the teacher's ladder
    rows = (tmp_path / "plots/claims.csv").read_text().splitlines()
    assert rows[0] == "run,iteration,mean,low,high" and len(rows) == 1 + 2 * len(V.CURVE_RUNS)
    assert (tmp_path / "reports/claims_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "| claim |" in out.stdout
    from osv.eval.report import claims_section

    text, verdicts = claims_section(tmp_path / "metrics", 0.95)
    assert set(verdicts) == {c[0] for c in V.CLAIMS}
    assert all(claim in text for _, claim, *_ in V.CLAIMS) and "claims_curves.png" in text
    assert "Not produced" in claims_section(tmp_path / "elsewhere", 0.95)[0]
