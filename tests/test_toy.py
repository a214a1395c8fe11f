"""The toy experiment (Fig. 5 in miniature) runs on exact ground truth and reports both m values."""

import torch

from osv.experiments import toy


def test_exact_denoiser_is_the_posterior_mean_of_one_gaussian():
    # With a single component the mixture denoiser reduces to μ + s²/(s²+σ²)(x − μ).
    gmm = toy.GaussianMixture(k=1)
    x = torch.randn(16, 2, dtype=torch.float64)
    sigma = 0.7
    mu, s = gmm.means[0], gmm.stds[0]
    expected = mu + s**2 / (s**2 + sigma**2) * (x - mu)
    assert torch.allclose(gmm.denoise(x, sigma), expected)


def test_reference_solver_converges():
    gmm = toy.GaussianMixture()
    x = torch.randn(64, 2, dtype=torch.float64) * 5
    coarse = toy.exact_consistency(gmm, x, 5.0, steps=100)
    fine = toy.exact_consistency(gmm, x, 5.0, steps=400)
    assert (coarse - fine).norm(dim=1).max() < 1e-2


def test_toy_reports_both_m(tmp_path):
    rows = toy.run_toy(ms=(1, 5), iterations=40, seeds=1)
    assert {r["m"] for r in rows} == {1, 5}
    assert all(r["error_mean"] > 0 and torch.isfinite(torch.tensor(r["error_mean"])) for r in rows)
    table = toy.format_table(rows)
    assert "| 1 | 40 |" in table and "| 5 | 40 |" in table
