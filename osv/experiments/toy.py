"""`osv experiment toy`: the paper's Fig. 5 (teacher sub-steps m) in miniature, on exact ground truth.

Data: a 2-D Gaussian mixture, whose denoiser is closed-form:
  D(x, σ) = Σ_k w_k(x, σ)·(μ_k + s_k²/(s_k²+σ²)·(x − μ_k)),  w_k ∝ π_k·N(x; μ_k, (s_k²+σ²)I).
A small MLP consistency model f_θ(x, σ) (consistency-model parametrisation with the exact
boundary f_θ(x, σ_min) = x) is trained with the stage-2 consistency loss only (no GAN) and an
EMA target, the teacher being m Euler sub-steps of the exact denoiser from σ_{n+m} to σ_n.
Runs with m = 1 (AnimateLCM) and m = 5 (OSV) use equal iterations; the error is measured
against the exact consistency function f*(x, σ) (the PF-ODE solved with many Heun steps of
the exact denoiser down to σ_min), averaged over σ levels of the grid.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

# Problem constants: a ring of 8 unequal, narrow Gaussians (multi-modal, so the ODE bends).
NUM_SIGMAS, SIGMA_MIN, SIGMA_MAX, RHO = 100, 0.002, 20.0, 7.0
EMA_DECAY, HUBER_C, BATCH, LR = 0.95, 0.001, 256, 2e-3
EVAL_LEVELS, EVAL_POINTS, REF_STEPS = 10, 1024, 200


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = RHO) -> torch.Tensor:
    """Ascending Karras sigmas (index 0 = sigma_min), float64."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (lo + ramp * (hi - lo)) ** rho


class GaussianMixture:
    """Exact denoiser and samples of a 2-D isotropic Gaussian mixture (float64)."""

    def __init__(self, k: int = 8, radius: float = 2.0):
        angles = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k)
        self.means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)  # [K, 2]
        self.stds = 0.08 + 0.12 * (torch.arange(k, dtype=torch.float64) % 3) / 2  # [K]
        w = 1.0 + (torch.arange(k, dtype=torch.float64) % 4)
        self.weights = w / w.sum()
        second = (self.weights[:, None] * (self.means**2 + self.stds[:, None] ** 2)).sum(0)
        first = (self.weights[:, None] * self.means).sum(0)
        self.sigma_data = float((second - first**2).mean().sqrt())

    def sample(self, n: int, gen: torch.Generator) -> torch.Tensor:
        comp = torch.multinomial(self.weights, n, replacement=True, generator=gen)
        noise = torch.randn(n, 2, generator=gen, dtype=torch.float64)
        return self.means[comp] + self.stds[comp, None] * noise

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """D(x, σ) for x [B, 2], σ [B] or scalar."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)  # [B|1, 1]
        var = self.stds[None, :] ** 2 + sigma**2  # [B, K]
        sq = ((x[:, None, :] - self.means[None]) ** 2).sum(-1)  # [B, K]
        logw = self.weights.log()[None] - sq / (2 * var) - var.log()  # 2-D Gaussian: det = var²
        w = torch.softmax(logw, dim=1)
        shrink = self.stds[None, :] ** 2 / var  # [B, K]
        comp_mean = self.means[None] + shrink[..., None] * (x[:, None, :] - self.means[None])
        return (w[..., None] * comp_mean).sum(1)


def euler(gmm: GaussianMixture, x: torch.Tensor, sigmas_desc: torch.Tensor) -> torch.Tensor:
    """Euler steps of the PF-ODE dx/dσ = (x − D)/σ; sigmas_desc [S+1, B] per sample."""
    for k in range(sigmas_desc.shape[0] - 1):
        s, s_next = sigmas_desc[k][:, None], sigmas_desc[k + 1][:, None]
        x = x + (s_next - s) * (x - gmm.denoise(x, s[:, 0])) / s
    return x


def exact_consistency(gmm: GaussianMixture, x: torch.Tensor, sigma: float, steps: int = REF_STEPS):
    """f*(x, σ): Heun (2nd order) over a fine Karras grid from σ down to σ_min."""
    grid = karras(steps + 1, SIGMA_MIN, sigma).flip(0)
    for k in range(steps):
        s, s_next = grid[k], grid[k + 1]
        d = (x - gmm.denoise(x, s)) / s
        x_euler = x + (s_next - s) * d
        d_next = (x_euler - gmm.denoise(x_euler, s_next)) / s_next
        x = x + (s_next - s) * (d + d_next) / 2
    return x


class ConsistencyMLP(nn.Module):
    """f_θ(x, σ) = c_skip·x + c_out·F_θ(c_in·x, c_noise), exact boundary at σ_min."""

    def __init__(self, sigma_data: float, width: int = 64, freqs: int = 8):
        super().__init__()
        self.sigma_data = sigma_data
        self.register_buffer("freqs", torch.arange(1, freqs + 1, dtype=torch.float32) * math.pi / 4)
        self.net = nn.Sequential(
            nn.Linear(2 + 2 * freqs, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
            nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2),
        )

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sd = self.sigma_data
        sigma = sigma.reshape(-1, 1).float()
        c_skip = sd**2 / ((sigma - SIGMA_MIN) ** 2 + sd**2)
        c_out = sd * (sigma - SIGMA_MIN) / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sigma**2 + sd**2).sqrt()
        c_noise = sigma.log() / 4 * self.freqs
        h = torch.cat([c_in * x.float(), c_noise.sin(), c_noise.cos()], dim=1)
        return c_skip * x.float() + c_out * self.net(h)


def weight(sigma_n: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """AnimateLCM's λ(σ_n) = (1/(σ_{n+m} − σ_n))^0.1 (the default acd.weighting)."""
    return (1.0 / (sigma_next - sigma_n)) ** 0.1


def train_consistency(gmm: GaussianMixture, m: int, iterations: int, seed: int, checkpoints: list[int]):
    """Consistency distillation with an m-sub-step exact-denoiser Euler teacher; errors at checkpoints."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    sigmas = karras(NUM_SIGMAS, SIGMA_MIN, SIGMA_MAX)
    student = ConsistencyMLP(gmm.sigma_data)
    ema = ConsistencyMLP(gmm.sigma_data)
    ema.load_state_dict(student.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.Adam(student.parameters(), lr=LR)
    errors = {}
    for it in range(1, iterations + 1):
        x0 = gmm.sample(BATCH, gen)
        n = torch.randint(0, NUM_SIGMAS - m, (BATCH,), generator=gen)
        x_nm = x0 + sigmas[n + m][:, None] * torch.randn(BATCH, 2, generator=gen, dtype=torch.float64)
        path = torch.stack([sigmas[n + m - j] for j in range(m + 1)])  # [m+1, B] descending
        with torch.no_grad():
            x_n = euler(gmm, x_nm, path)
            y = ema(x_n, sigmas[n])
        y_hat = student(x_nm, sigmas[n + m])
        dist = ((y_hat - y) ** 2 + HUBER_C**2).sqrt() - HUBER_C
        loss = (weight(sigmas[n], sigmas[n + m]).float()[:, None] * dist).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), student.parameters()):
                p_ema.lerp_(p, 1 - EMA_DECAY)
        if it in checkpoints:
            errors[it] = consistency_error(gmm, student)
    return errors


_REFERENCE_CACHE: dict = {}


def eval_points(gmm: GaussianMixture):
    """Fixed evaluation set: (σ level, x, f*(x, σ)) for EVAL_LEVELS levels of the grid."""
    if "points" not in _REFERENCE_CACHE:
        sigmas = karras(NUM_SIGMAS, SIGMA_MIN, SIGMA_MAX)
        gen = torch.Generator().manual_seed(12345)
        levels = torch.linspace(NUM_SIGMAS // EVAL_LEVELS, NUM_SIGMAS - 1, EVAL_LEVELS).long()
        points = []
        for idx in levels.tolist():
            sigma = float(sigmas[idx])
            x = gmm.sample(EVAL_POINTS, gen) + sigma * torch.randn(EVAL_POINTS, 2, generator=gen, dtype=torch.float64)
            points.append((sigma, x, exact_consistency(gmm, x, sigma)))
        _REFERENCE_CACHE["points"] = points
    return _REFERENCE_CACHE["points"]


@torch.no_grad()
def consistency_error(gmm: GaussianMixture, model: nn.Module) -> float:
    """Mean over σ levels of the mean L2 distance ‖f_θ(x, σ) − f*(x, σ)‖."""
    errs = []
    for sigma, x, target in eval_points(gmm):
        pred = model(x, torch.full((x.shape[0],), sigma, dtype=torch.float64)).double()
        errs.append((pred - target).norm(dim=1).mean())
    return float(torch.stack(errs).mean())


def run_toy(ms=(1, 5), iterations: int = 1500, seeds: int = 3, base_seed: int = 0) -> list[dict]:
    """Train every (m, seed); rows of (m, iterations, error mean, std) at half and full iterations."""
    from tqdm import tqdm

    torch.set_num_threads(1)
    gmm = GaussianMixture()
    eval_points(gmm)
    checkpoints = sorted({iterations // 2, iterations})
    results = {(m, it): [] for m in ms for it in checkpoints}
    for m in ms:
        for s in tqdm(range(seeds), desc=f"toy m={m}"):
            for it, err in train_consistency(gmm, m, iterations, base_seed + s, checkpoints).items():
                results[(m, it)].append(err)
    rows = []
    for (m, it), errs in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        t = torch.tensor(errs, dtype=torch.float64)
        std = float(t.std()) if len(errs) > 1 else 0.0
        rows.append({"m": m, "iterations": it, "error_mean": float(t.mean()), "error_std": std, "seeds": len(errs)})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| m | iterations | error to exact f* (mean ± std over seeds) | seeds |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['m']} | {r['iterations']} | {r['error_mean']:.4f} ± {r['error_std']:.4f} | {r['seeds']} |")
    return "\n".join(lines)


def cmd_toy(args: argparse.Namespace) -> int:
    seed = 0
    if args.params:
        from osv.params import load_params

        seed = load_params(args.params)["seed"]
    t0 = time.time()
    rows = run_toy(tuple(args.m), args.iterations, args.seeds, seed)
    table = format_table(rows)
    note = (
        f"\nToy 2-D Gaussian mixture, N={NUM_SIGMAS} Karras sigmas in [{SIGMA_MIN}, {SIGMA_MAX}], "
        f"batch {BATCH}, EMA {EMA_DECAY}; error averaged over {EVAL_LEVELS} sigma levels "
        f"({EVAL_POINTS} points each); {time.time() - t0:.1f} s.\n"
    )
    print(table + note)
    if args.out:
        from osv.atomic import write_json, write_text

        if args.out.endswith(".json"):
            write_json(args.out, {"rows": rows, "table": table, "note": note.strip()})
        else:
            write_text(args.out, table + "\n" + note)
    return 0


def register(subparsers) -> None:
    exp = subparsers.add_parser("experiment", help="Small experiments on exact ground truth.")
    sub = exp.add_subparsers(dest="experiment", required=True)
    p = sub.add_parser("toy", help="Teacher sub-steps m = 1 vs 5 on a 2-D Gaussian mixture (Fig. 5 in miniature).")
    p.add_argument("--params", default=None, help="params.yaml (only its seed is used)")
    p.add_argument("--m", type=int, nargs="+", default=[1, 5], help="teacher Euler sub-steps to compare")
    p.add_argument("--iterations", type=int, default=1500)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", default=None, help="write the table here (.json for JSON, else markdown)")
    p.set_defaults(func=cmd_toy)
