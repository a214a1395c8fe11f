"""`osv experiment claims`: the paper's qualitative claims (Tables 1-2, Fig. 5) on a miniature with an exact teacher.

The "video" is T frames of C channels (1×1 pixels): x0[t] = c + motion_k[t] + s_k·ε_t, where c is the
conditioning first frame and k one of K motions (a Gaussian mixture given c). The teacher is the exact
denoiser of that mixture; its CFG negative branch zeroes c, as SVD's c0 zeroes the image latent, so both
branches are closed form. The target is the exact guided distribution: the teacher's guided PF-ODE
(the training ramp, acd.cfg) solved with `claims.reference_steps` Euler steps.

The student is the teacher plus a zero-initialised residual MLP (as the paper's student starts as the
teacher plus zero LoRA); the discriminator is an MLP with per-frame ("spatial") and whole-clip
("temporal") heads. Both stages run through the package's own `osv.train.distill.train_step` with the
params' lgp/acd settings, so the miniature tests the code the embedded and paper runs train with.

Every arm is trained and evaluated with `claims.seeds` seeds; a claim compares two arms by the paired
difference of their energy distances to the target (same seed: same data, noise and evaluation draws),
with a Student-t 95% interval over seeds and a verdict: reproduced, not reproduced, or inconclusive.
"""

from __future__ import annotations

import argparse
import copy
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from osv.conditioning import SVDConditioning
from osv.experiments.verdicts import ARMS, CURVE_RUNS, arms_table, claims_table, summarise
from osv.sde import Denoiser, _per_sample, karras_sigmas, precondition

FRAMES, CHANNELS = 4, 2

# Training runs: name -> (stage-1 run it starts from or None, stage-2 overrides); "stage1*" are stage 1 only.
RUNS = {
    "stage1": (None, None),
    "stage1_no_adv": (None, None),
    "osv": ("stage1", {}),
    "m1": ("stage1", {"m": 1}),
    "no_adv": ("stage1_no_adv", {"lambda_adv": 0.0}),
    "no_stage1": (None, {}),
}

# ----------------------------------------------------------------------------- the miniature


class MotionMixture:
    """Clips of K motions: k ~ π, first frame c | k ~ N(β·v_k, I) (the image hints at the motion), then
    x0[t] = c + motion_k[t] + s_k·ε_t. Given c it is a Gaussian mixture with weights p(k | c) ∝ π_k·N(c; β·v_k, I).

    The CFG negative branch (image embedding zeroed, as `SVDConditioning.uncond` does) is the marginal p(x0),
    what a teacher trained with conditioning dropout learns for it: per k a Gaussian of mean β·v_k + motion_k
    whose covariance adds 1 along each channel's all-frames direction u = 1_T/√T. Guidance w > 1 sharpens
    p(k | c) (the CFG effect that matters: mass moves between motions), so the guided target is far from
    the conditional one.
    """

    def __init__(self, k: int = 4, speed: float = 2.0, hint: float = 0.25):
        angles = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k) + 0.3
        ramp = torch.linspace(0, 1, FRAMES, dtype=torch.float64)
        velocity = speed * torch.stack([angles.cos(), angles.sin()], dim=1)  # [K, C]
        self.motions = ramp[None, :, None] * velocity[:, None, :]  # [K, T, C], frame 0 = 0
        self.hints = hint * velocity  # [K, C]: mean of the first frame given k
        self.stds = torch.tensor([0.1, 0.2, 0.15, 0.3], dtype=torch.float64)[:k]
        w = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)[:k]
        self.weights = w / w.sum()

    def sample(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(first frames c [n, C, 1, 1], clips x0 [n, T, C, 1, 1]), float32."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=gen)
        c = self.hints[comp] + torch.randn(n, CHANNELS, generator=gen, dtype=torch.float64)
        noise = torch.randn(n, FRAMES, CHANNELS, generator=gen, dtype=torch.float64)
        x = self.motions[comp] + self.stds[comp, None, None] * noise + c[:, None, :]
        return c.reshape(n, CHANNELS, 1, 1).float(), x.reshape(n, FRAMES, CHANNELS, 1, 1).float()

    def denoise(self, x: torch.Tensor, sigma, cond: SVDConditioning) -> torch.Tensor:
        """Exact D(x, σ | c) (or of the marginal where the image embedding is zero), in float64 inside."""
        b = x.shape[0]
        conditional = (cond.image_embeds.flatten(1).abs().sum(1) > 0)[:, None]  # [B, 1]
        c = cond.cond_latents.double().flatten(1)[:, None, :]  # [B, 1, C]
        offset = torch.where(conditional[..., None], c, self.hints[None])  # [B, K, C]: frame-0 mean per k
        log_prior = self.weights.log()[None] - conditional * 0.5 * ((c - self.hints[None]) ** 2).sum(-1)  # [B, K]
        r = x.double().reshape(b, 1, FRAMES, CHANNELS) - offset[:, :, None, :] - self.motions[None]  # [B, K, T, C]
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)  # [B|1, 1]
        var = self.stds[None] ** 2 + sigma**2  # [B|1, K]: every direction but u
        var_u = var + FRAMES * (~conditional).double()  # [B, K]: along u (marginal: + T·Var c)
        r_u = r.mean(2, keepdim=True)  # [B, K, 1, C]: the projection on u, per channel
        r_perp = r - r_u
        sq = (r_perp**2).sum((2, 3)) / var + FRAMES * (r_u**2).sum((2, 3)) / var_u
        logw = log_prior - sq / 2 - 0.5 * ((FRAMES - 1) * CHANNELS * var.log() + CHANNELS * var_u.log())
        w = torch.softmax(logw, dim=1)[..., None, None]  # [B, K, 1, 1]
        comp = x.double().reshape(b, 1, FRAMES, CHANNELS) - sigma[..., None, None] ** 2 * (
            r_perp / var[..., None, None] + r_u / var_u[..., None, None])
        return (w * comp).sum(1).reshape(x.shape).to(x.dtype)


class Residual(nn.Module):
    """The student's trainable part: F_θ = F_teacher + MLP(c_in·x, c_noise, c), last layer zero (θ = teacher at init)."""

    def __init__(self, hidden: int):
        super().__init__()
        d = FRAMES * CHANNELS
        self.net = nn.Sequential(nn.Linear(d + CHANNELS + 1, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, d))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x_in, c_noise, cond):
        c_noise = torch.as_tensor(c_noise, dtype=x_in.dtype).reshape(-1, 1).expand(x_in.shape[0], 1)
        h = torch.cat([x_in.flatten(1), cond.cond_latents.flatten(1), c_noise], dim=1)
        return self.net(h).reshape(x_in.shape)


class MiniDisc(nn.Module):
    """Logits [B, T + 1]: a shared per-frame head (spatial) and a whole-clip head (temporal)."""

    frozen_front_end = False

    def __init__(self, hidden: int):
        super().__init__()
        self.spatial = nn.Sequential(nn.Linear(CHANNELS, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        self.temporal = nn.Sequential(nn.Linear(FRAMES * CHANNELS, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, latents):
        frames = latents.flatten(2)  # [B, T, C]
        return torch.cat([self.spatial(frames).squeeze(-1), self.temporal(frames.flatten(1))], dim=1)

    def trainable_parameters(self):
        return list(self.parameters())


class StudentDenoiser(Denoiser):
    """f_θ with F_θ = F_teacher + residual(c_in·x, c_noise, c) (F_teacher recovered from the closed-form D)."""

    def __init__(self, mixture: MotionMixture, residual: Residual, sigma_min: float, boundary: str):
        super().__init__(residual.forward, boundary=boundary, sigma_min=sigma_min)
        self.teacher = Denoiser.from_fn(mixture.denoise, sigma_min=sigma_min)
        self.residual = residual

    def _evaluate(self, x, sigma, cond):
        _, _, c_in, c_noise = precondition(sigma)
        return self.teacher._evaluate(x, sigma, cond) + self.residual(_per_sample(c_in, x) * x, c_noise, cond)


def conditioning(c: torch.Tensor) -> SVDConditioning:
    b = c.shape[0]
    return SVDConditioning(torch.ones(b, 1, 1), c, torch.zeros(b, 3))  # uncond() zeroes the embedding


# ----------------------------------------------------------------------------- training


@dataclass
class Trained:
    residual: Residual
    ema: dict
    disc: MiniDisc
    curve: list  # (iteration, energy distance of the 1-step sample)


def run_params(params: dict, stage: str, overrides: dict | None) -> dict:
    """The params of one miniature run: the package's lgp/acd settings with the miniature's lr and overrides."""
    cfg = params["claims"]
    out = copy.deepcopy(params)
    out[stage].update(lr=cfg["lr"], lr_disc=cfg["lr_disc"], **(overrides or {}))
    out["train"]["grad_clip"] = 0.0
    return out


def train_run(params, mixture, sigmas, stage, steps, seed, start: Trained | None, overrides, evaluate=None):
    """`steps` iterations of the package's train_step on the miniature; `evaluate(denoiser)` every eval_every."""
    from osv.train.distill import Nets, State, make_optimizers, train_step
    from osv.train.distributed import DistEnv
    from osv.train.loop import Precision

    cfg, p = params["claims"], run_params(params, stage, overrides)
    p["seed"] = seed
    torch.manual_seed(seed)
    residual = copy.deepcopy(start.residual) if start else Residual(cfg["hidden"])
    disc = copy.deepcopy(start.disc) if start else MiniDisc(cfg["hidden"])
    trainable = dict(residual.named_parameters())
    ema = {n: (start.ema[n] if start else v.detach()).clone() for n, v in trainable.items()}
    sigma_min, boundary = params["sde"]["sigma_min"], params["student"].get("boundary", "approx")
    nets = Nets(residual, StudentDenoiser(mixture, residual, sigma_min, boundary), trainable, ema,
                Denoiser.from_fn(mixture.denoise, sigma_min=sigma_min) if stage == "acd" else None,
                disc if p[stage]["lambda_adv"] > 0 else None)
    state = State()
    state.opt_g, state.opt_d = make_optimizers(nets, p[stage])
    gen = torch.Generator().manual_seed(seed * 7919 + (1 if stage == "acd" else 0))
    prec, env, curve = Precision("fp32", torch.device("cpu")), DistEnv(), []
    slots = list(range(cfg["batch_size"]))
    for step in range(steps):
        c, x0 = mixture.sample(cfg["batch_size"], gen)
        batch = {"latents": x0, "cond_latents": c, "image_embeds": torch.ones(len(c), 1, 1)}
        state.step = step
        train_step(nets, state, batch, slots, p, stage, sigmas, prec, env)
        if evaluate and ((step + 1) % cfg["eval_every"] == 0 or step + 1 == steps):
            curve.append((step + 1, evaluate(ema_denoiser(mixture, residual, ema, sigma_min, boundary))))
    return Trained(residual, {n: v.clone() for n, v in ema.items()}, disc, curve)


def ema_denoiser(mixture, residual, ema, sigma_min, boundary) -> Denoiser:
    """The EMA student θ⁻, the network the paper samples from."""
    copy_ = copy.deepcopy(residual)
    with torch.no_grad():
        for name, value in copy_.named_parameters():
            value.copy_(ema[name])
    return StudentDenoiser(mixture, copy_, sigma_min, boundary)


# ----------------------------------------------------------------------------- evaluation


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased energy distance 2E|X−Y| − E|X−X'| − E|Y−Y'| between samples [n, d] and [n, d].

    Row i of x and of y share their first frame (paired draws), so the cross term skips i = j: the
    pairs it keeps are independent, and the estimate is 0 in expectation for equal distributions.
    """
    x, y = x.double(), y.double()
    n, m = len(x), len(y)
    if n != m:
        raise ValueError(f"energy_distance: paired samples need equal sizes, got {n} and {m}")
    cross = torch.cdist(x, y)
    xy = (cross.sum() - cross.diagonal().sum()) / (n * (n - 1))
    xx = torch.cdist(x, x).sum() / (n * (n - 1))
    yy = torch.cdist(y, y).sum() / (m * (m - 1))
    return float(2 * xy - xx - yy)


def sample_arm(denoiser, arm, c, params, gen) -> torch.Tensor:
    """Samples [n, T·C] of one arm for first frames c, with the package's samplers."""
    from osv.samplers import consistency_sample, guidance_ramp, teacher_sample, tts_sample

    sde, shape, ramp = params["sde"], (c.shape[0], FRAMES, CHANNELS, 1, 1), params["acd"]["cfg"]
    grid = dict(sigma_min=sde["sigma_min"], sigma_max=sde["sigma_max"], rho=sde["rho"])
    _, sampler, steps, cfg = arm
    w = guidance_ramp(ramp["max"], FRAMES, ramp["min"]) if cfg == "train" else None
    cond = conditioning(c)
    if sampler == "teacher":
        out = teacher_sample(denoiser, cond, shape, steps=steps, cfg=w, generator=gen, **grid)
    elif sampler == "consistency":
        out = consistency_sample(denoiser, cond, shape, steps=steps, cfg=w, generator=gen,
                                 num_sigmas=params["claims"]["num_sigmas"], **grid)
    else:
        out = tts_sample(denoiser, cond, shape, generator=gen, num_sigmas=params["claims"]["num_sigmas"], **grid)
    return out.latents.flatten(1)


class Evaluator:
    """Energy distance between an arm's (c, x) samples and the exact guided teacher's, for one seed."""

    def __init__(self, params, mixture, seed: int):
        cfg, self.params = params["claims"], params
        self.teacher = Denoiser.from_fn(mixture.denoise, sigma_min=params["sde"]["sigma_min"])
        gen = torch.Generator().manual_seed(10_000 + seed)
        self.c, _ = mixture.sample(cfg["eval_points"], gen)
        # Common random numbers: the arms start from the target's own first frames and initial noise, so
        # the distance measures the method, not the draw (an exact consistency model would give the target).
        self.noise_seed = 20_000 + seed
        reference = (None, "teacher", cfg["reference_steps"], "train")
        self.reference = self.joint(self.c, sample_arm(self.teacher, reference, self.c, params,
                                                       torch.Generator().manual_seed(self.noise_seed)))

    @staticmethod
    def joint(c, x):
        return torch.cat([c.flatten(1), x], dim=1)

    def __call__(self, denoiser, arm=("osv", "consistency", 1, None)) -> float:
        x = sample_arm(denoiser, arm, self.c, self.params, torch.Generator().manual_seed(self.noise_seed))
        return energy_distance(self.joint(self.c, x), self.reference)


def run_seed(params, seed: int, progress) -> tuple[dict, dict]:
    """Every run and arm for one seed: ({arm: distance}, {run: curve})."""
    cfg, sde = params["claims"], params["sde"]
    mixture = MotionMixture()
    sigmas = karras_sigmas(cfg["num_sigmas"], sde["sigma_min"], sde["sigma_max"], sde["rho"]).float()
    evaluate = Evaluator(params, mixture, seed)
    trained = {}
    for name, (init, acd_overrides) in RUNS.items():
        if acd_overrides is None:  # stage 1
            overrides = {"lambda_adv": 0.0} if name == "stage1_no_adv" else {}
            trained[name] = train_run(params, mixture, sigmas, "lgp", cfg["stage1_steps"], seed, None, overrides)
        else:
            trained[name] = train_run(params, mixture, sigmas, "acd", cfg["stage2_steps"], seed,
                                      trained.get(init), acd_overrides, evaluate if name in CURVE_RUNS else None)
        progress.update(1)
    boundary = params["student"].get("boundary", "approx")
    distances = {}
    for arm_name, arm in ARMS.items():
        run = arm[0]
        denoiser = evaluate.teacher if run is None else ema_denoiser(
            mixture, trained[run].residual, trained[run].ema, sde["sigma_min"], boundary)
        distances[arm_name] = evaluate(denoiser, arm)
    return distances, {run: trained[run].curve for run in CURVE_RUNS}


# ----------------------------------------------------------------------------- outputs


def plot_curves(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from osv.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(6, 4))
    for run in CURVE_RUNS:
        pts = [r for r in rows if r["run"] == run]
        its = [r["iteration"] for r in pts]
        ax.plot(its, [r["mean"] for r in pts], label=run)
        ax.fill_between(its, [r["low"] for r in pts], [r["high"] for r in pts], alpha=0.2)
    ax.set_xlabel("stage-2 iteration")
    ax.set_ylabel("energy distance of the 1-step sample to the guided teacher")
    ax.set_yscale("log")
    ax.set_title("Claims miniature: stage-2 curves (mean, 95% interval over seeds)")
    ax.legend()
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def run_claims(params: dict) -> dict:
    from tqdm import tqdm

    torch.set_num_threads(1)
    cfg = params["claims"]
    seeds = [params["seed"] * 1000 + s for s in range(cfg["seeds"])]
    per_seed, curves = [], []
    with tqdm(total=len(seeds) * len(RUNS), desc="claims: training runs") as progress:
        for seed in seeds:
            distances, curve = run_seed(params, seed, progress)
            per_seed.append(distances)
            curves.append(curve)
    return summarise(per_seed, curves, cfg["level"])


def protocol(params: dict) -> dict:
    cfg, ramp = params["claims"], params["acd"]["cfg"]
    return {
        "data": f"{FRAMES}-frame, {CHANNELS}-channel Gaussian-mixture videos (4 motions) given the first frame c",
        "teacher": "exact closed-form denoiser; CFG negative branch = the marginal over c (conditioning dropout)",
        "target": f"guided teacher PF-ODE, Euler {cfg['reference_steps']} steps, ramp {ramp['min']} -> {ramp['max']}",
        "distance": f"unbiased energy distance on (c, clip), {cfg['eval_points']} points each, paired c",
        "seeds": [params["seed"] * 1000 + s for s in range(cfg["seeds"])],
        "interval": f"Student-t {cfg['level']:.0%} over seeds, paired by seed",
        "student": "exact teacher + zero-initialised residual MLP, EMA sampled; both stages via osv train_step",
    }


def claims_stage(params: dict, out: str, plot: str | None, csv: str | None) -> dict:
    """The DAG stage: metrics (numbers) + provenance (protocol, verdicts, per-seed values), curves plot and CSV."""
    from osv.provenance import record, write_metrics

    result = run_claims(params)
    if plot:
        plot_curves(result["curves"], Path(plot))
    if csv:
        from osv.atomic import write_text

        rows = ["run,iteration,mean,low,high"] + [f"{r['run']},{r['iteration']},{r['mean']:.6g},{r['low']:.6g},"
                                                  f"{r['high']:.6g}" for r in result["curves"]]
        write_text(csv, "\n".join(rows) + "\n")
    prov = record(params, "claims", precision="fp32", device="cpu",
                  weights="miniature: exact Gaussian-mixture teacher + MLP student built here, not SVD")
    write_metrics(out, {**result, "protocol": protocol(params)}, prov)
    return result


def command(args: argparse.Namespace) -> int:
    from osv.launch import run_stage
    from osv.params import load_params

    params = load_params(args.params)
    result = run_stage("claims", claims_stage, {"params": params, "out": args.out, "plot": args.plot,
                                                "csv": args.csv}, params)
    level = params["claims"]["level"]
    print(arms_table(result, level) + "\n\n" + claims_table(result, level))
    return 0


def register(subparsers) -> None:
    exp = subparsers.add_parser("experiment", help="The paper's claims on a miniature with an exact teacher.")
    sub = exp.add_subparsers(dest="experiment", required=True)
    p = sub.add_parser("claims", help="Tables 1-2 and Fig. 5 in miniature: arms over seeds, a verdict per claim.")
    p.add_argument("--params", default="params.yaml", help="params file")
    p.add_argument("--out", default="metrics/claims.json", help="metrics (numbers); the provenance goes beside it")
    p.add_argument("--plot", default=None, help="stage-2 curves (png)")
    p.add_argument("--csv", default=None, help="the same curves as CSV (DVC plots)")
    p.set_defaults(func=command)
