"""`osv teacher`: the teacher SVD pipeline folder models/teacher.

Embedded scale (teacher.steps > 0): the small random UNet of models/base is trained with the
EDM denoising loss in SVD's parametrisation (σ_data = 1, v-prediction):
  σ = exp(p_mean + p_std·N(0,1)),  x = x0 + σ·ε,  loss = λ(σ)·‖D(x, σ) − x0‖²,
  λ(σ) = (σ² + σ_data²)/(σ·σ_data)²,
with the image conditioning (CLIP embedding and first-frame latent) zeroed with probability
teacher.cond_dropout so that classifier-free guidance works. Paper scale (teacher.steps = 0):
the pretrained SVD of models/base is the teacher (files linked, not trained).

Both scales report on the held-out test latents, before and after:
  heldout_loss: the same weighted loss at a fixed σ grid with fixed noise seeds;
  denoise_mse: ‖x̂0 − x0‖² (per element) of a 4-step conditional Euler denoise from σ = 2
      (a medium noise level: σ_data = 1) — how well the teacher recovers the held-out clip;
  sample_stats_error: 10-step samples from pure noise, conditioned on the test first frames,
      without guidance (the distribution the EDM loss trains; CFG 3 inflates the std of a small
      teacher's samples, 1.5 vs 0.9 measured): squared error between the per-channel mean, std and
      frame-difference std (motion) of the sampled latents and of the test latents — does the
      teacher generate latents of the right distribution, moving as much as the data.
The folder gets the trained unet, models/vae as vae/, and everything else of models/base
(image_encoder, feature_extractor, scheduler, model_index.json, dinov2/ for the discriminator).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

EVAL_SIGMAS = (0.02, 0.1, 0.3, 0.7, 1.5, 3.0, 8.0, 30.0)
DENOISE_FROM_SIGMA, DENOISE_STEPS, SAMPLE_STEPS, SAMPLE_CFG = 2.0, 4, 10, 1.0
EVALS_DURING_TRAINING = 2
EVAL_CLIPS = 8  # the first test clips (sorted order of the split): bounded cost at paper scale too
CURVE_COLUMNS = ["step", "loss", "lr", "heldout_loss"]


def edm_weight(sigma: torch.Tensor, sigma_data: float = 1.0) -> torch.Tensor:
    """λ(σ) = (σ² + σ_data²)/(σ·σ_data)² (SVD/EDM)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def _shape(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def denoising_loss(denoiser, x0, cond, sigma, noise) -> torch.Tensor:
    """Per-sample λ(σ)·mean((D(x0 + σε, σ) − x0)²), [B]."""
    sigma = sigma.to(x0)
    denoised = denoiser.denoise(x0 + _shape(sigma, x0) * noise, sigma, cond)
    return edm_weight(sigma) * (denoised.float() - x0.float()).square().flatten(1).mean(1)


def drop_condition(cond, keep: torch.Tensor):
    """Zero the image conditioning (CLIP embedding and first-frame latent) where keep is 0."""
    from osv.conditioning import SVDConditioning

    k = keep.to(cond.image_embeds)
    return SVDConditioning(cond.image_embeds * k.reshape(-1, 1, 1), cond.cond_latents * k.reshape(-1, 1, 1, 1),
                           cond.added_time_ids)


# ----------------------------------------------------------------------------- evaluation


def load_split(latents_root, split: str, params: dict, device, low: bool = False, limit: int | None = None) -> dict:
    """The first `limit` (default all) clips of one split/resolution as one collated batch."""
    from osv.latents import LatentDataset
    from osv.train.loop import collate

    size = params["data"]["low_resolution" if low else "resolution"]
    ds = LatentDataset(latents_root, split, size["width"], size["height"])
    if len(ds) == 0:
        raise ValueError(f"{latents_root}: split {split} at {size['width']}x{size['height']} has no clips")
    return collate([ds[i] for i in range(min(len(ds), limit or len(ds)))], device)


@torch.no_grad()
def heldout_loss(denoiser, test: dict, params: dict, seed: int, chunk: int = 16,
                 progress: bool = False) -> dict[str, float]:
    """Weighted denoising loss on the test latents at EVAL_SIGMAS, noise seeded per (σ level, clip)."""
    from osv.conditioning import from_batch
    from osv.train.loop import sample_randn

    x0 = test["latents"]
    cond = from_batch(test, params, device=x0.device)
    per_sigma = {}
    for level, s in enumerate(tqdm(EVAL_SIGMAS, desc="held-out loss", unit="σ", disable=not progress)):
        losses = []
        for i in range(0, x0.shape[0], chunk):
            idx = list(range(i, min(i + chunk, x0.shape[0])))
            noise = sample_randn(x0.shape[1:], seed, 10_000 + level, idx, "eval", x0.device)
            sigma = torch.full((len(idx),), s, device=x0.device)
            losses.append(denoising_loss(denoiser, x0[idx], cond.select(idx), sigma, noise))
        per_sigma[f"{s:g}"] = float(torch.cat(losses).mean())
    return {"heldout_loss": sum(per_sigma.values()) / len(per_sigma), "heldout_loss_by_sigma": per_sigma}


@torch.no_grad()
def sample_quality(denoiser, test: dict, params: dict, seed: int) -> dict[str, float]:
    """denoise_mse (4-step Euler from σ = 2) and sample_stats_error (10-step unguided samples),
    in chunks of eval.batch_size clips."""
    from osv.conditioning import from_batch
    from osv.samplers import teacher_sample
    from osv.sde import karras_sigmas
    from osv.solver import euler_solve
    from osv.train.loop import generator_for, sample_randn

    x0 = test["latents"]
    cond = from_batch(test, params, device=x0.device)
    sde, chunk = params["sde"], params["eval"]["batch_size"]
    path = karras_sigmas(DENOISE_STEPS, sde["sigma_min"], DENOISE_FROM_SIGMA, sde["rho"]).flip(0)
    path = torch.cat([path, path.new_zeros(1)]).to(x0)
    sq_err, samples = [], []
    for start in tqdm(range(0, x0.shape[0], chunk), desc="sample quality", unit="batch"):
        idx = list(range(start, min(start + chunk, x0.shape[0])))
        noisy = x0[idx] + DENOISE_FROM_SIGMA * sample_randn(x0.shape[1:], seed, 20_000, idx, "eval", x0.device)
        sq_err.append((euler_solve(denoiser, noisy, path, cond.select(idx)) - x0[idx]).square().flatten(1).mean(1))
        gen = generator_for(seed, 30_000, start, "eval")
        samples.append(teacher_sample(denoiser, cond.select(idx), (len(idx), *x0.shape[1:]), steps=SAMPLE_STEPS,
                                      cfg=SAMPLE_CFG, generator=gen, sigma_min=sde["sigma_min"],
                                      sigma_max=sde["sigma_max"], rho=sde["rho"], init_noise="edm").latents)
    denoise_mse = float(torch.cat(sq_err).mean())
    samples = torch.cat(samples)
    errors = [(a - b).square().mean() for a, b in zip(latent_stats(samples), latent_stats(x0))]
    return {"denoise_mse": denoise_mse, "sample_stats_error": float(sum(errors))}


def latent_stats(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per latent channel of [B, T, C, h, w]: mean, std, and std of the frame differences (motion)."""
    dims = (0, 1, 3, 4)
    return x.mean(dims), x.std(dims), (x[:, 1:] - x[:, :-1]).std(dims)


def evaluate(denoiser, test: dict, params: dict) -> dict:
    seed = params["seed"]
    was_training = denoiser.module.training
    denoiser.module.eval()
    out = {**heldout_loss(denoiser, test, params, seed, progress=True), **sample_quality(denoiser, test, params, seed)}
    denoiser.module.train(was_training)
    return out


# ----------------------------------------------------------------------------- training


def train_teacher(unet, params: dict, latents_root, device, curve) -> None:
    """teacher.steps Adam steps of the conditional-dropout EDM loss on the train latents."""
    from osv.conditioning import from_batch
    from osv.latents import LatentDataset
    from osv.numerics import injected
    from osv.sde import Denoiser
    from osv.train.logging import progress
    from osv.train.loop import Precision, check_finite, collate, data_indices, sample_rand, sample_randn

    cfg, seed = params["teacher"], params["seed"]
    size = params["data"]["resolution"]
    ds = LatentDataset(latents_root, "train", size["width"], size["height"])
    test = load_split(latents_root, "test", params, device, limit=EVAL_CLIPS)
    denoiser = Denoiser(unet, sigma_min=params["sde"]["sigma_min"])
    opt = torch.optim.Adam(unet.parameters(), lr=cfg["lr"])
    prec = Precision(params["train"]["precision"], device)
    eval_every = max(1, cfg["steps"] // EVALS_DURING_TRAINING)
    unet.train()
    with progress(cfg["steps"], desc="teacher") as bar:  # closed on errors too: their line stays clean
        for step in range(cfg["steps"]):
            idx = data_indices(seed, step, cfg["batch_size"], len(ds))
            batch = collate([ds[i] for i in idx], device)
            slots = list(range(len(idx)))  # sample identities for the noise streams
            x0 = batch["latents"]
            sigma = (cfg["p_mean"] + cfg["p_std"] * sample_randn((), seed, step, slots, "sigma")).exp().to(device)
            keep = (sample_rand(seed, step, slots, "dropout") >= cfg["cond_dropout"]).float().to(device)
            cond = drop_condition(from_batch(batch, params, device=device), keep)
            with prec.autocast():
                loss = denoising_loss(denoiser, x0, cond, sigma, sample_randn(x0.shape[1:], seed, step, slots,
                                                                              device=device)).mean()
            loss = loss * injected("teacher", step)
            check_finite("teacher", {"loss": loss}, step, None)
            opt.zero_grad(set_to_none=True)
            prec.backward(loss)
            prec.step(opt, list(unet.parameters()), params["train"]["grad_clip"])
            row = {"step": step + 1, "loss": float(loss.detach()), "lr": cfg["lr"]}
            if (step + 1) % eval_every == 0 and step + 1 < cfg["steps"]:
                row["heldout_loss"] = evaluate_loss_only(denoiser, test, params)
            curve.append(row)
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
            bar.update(1)
    unet.eval()


def evaluate_loss_only(denoiser, test, params) -> float:
    denoiser.module.eval()
    value = heldout_loss(denoiser, test, params, params["seed"])["heldout_loss"]
    denoiser.module.train()
    return value


# ----------------------------------------------------------------------------- folder


def _link_or_copy(src, dst) -> None:
    """Hard link (no extra disk for multi-GB SVD files), else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_pipeline_folder(out, base, vae, unet=None, provenance: dict | None = None) -> None:
    """models/teacher atomically: base's parts, models/vae as vae/, the trained unet (or base's)."""
    from osv.atomic import atomic_path

    base, vae = Path(base), Path(vae)
    skip = {"vae"} | ({"unet"} if unet is not None else set())
    with atomic_path(out) as tmp:
        # Hidden files are workflow state (e.g. .snakemake_timestamp): a hard link would tie
        # the two folders' timestamps together and make Snakemake rerun everything downstream.
        shutil.copytree(base, tmp, copy_function=_link_or_copy,
                        ignore=lambda d, names: [n for n in names if n.startswith(".")
                                                 or (Path(d) == base and n in skip)])
        shutil.copytree(vae, tmp / "vae", copy_function=_link_or_copy,
                        ignore=lambda d, names: [n for n in names if n.startswith(".")])
        if unet is not None:
            unet.save_pretrained(tmp / "unet")
        if provenance is not None:
            import json

            (tmp / "teacher.json").write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")


def teacher_run(params: dict, base: str, vae: str, latents: str, out: str, metrics: str, plots: str) -> dict:
    """The work function of the teacher stage (module-level: submitit pickles it)."""
    from osv.models import load_unet
    from osv.numerics import require_finite_module
    from osv.provenance import record, require_finite_metrics, write_metrics
    from osv.sde import Denoiser
    from osv.train.logging import Curve
    from osv.train.loop import Precision

    for path, what in ((base, "--base"), (vae, "--vae"), (latents, "--latents")):
        if not Path(path).exists():
            raise FileNotFoundError(f"osv teacher: {what} {path} does not exist")
    t0 = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(params["seed"])
    unet = load_unet(base).to(device)
    test = load_split(latents, "test", params, device, limit=EVAL_CLIPS)
    denoiser = Denoiser(unet, sigma_min=params["sde"]["sigma_min"])
    before = evaluate(denoiser, test, params)
    curve = Curve(CURVE_COLUMNS)
    curve.append({"step": 0, "heldout_loss": before["heldout_loss"]})
    trained = params["teacher"]["steps"] > 0
    if trained:
        train_teacher(unet, params, latents, device, curve)
    after = evaluate(denoiser, test, params) if trained else before
    curve.append({"step": params["teacher"]["steps"], "heldout_loss": after["heldout_loss"]})
    provenance = _provenance(params, base)
    result = {"before": before, "after": after, "trained": trained, "steps": params["teacher"]["steps"],
              "seconds": round(time.time() - t0, 1), "protocol": _protocol(params)}
    if trained:
        require_finite_module("teacher", unet, "the trained teacher UNet")
    require_finite_metrics("teacher", result, metrics)
    write_pipeline_folder(out, base, vae, unet.to("cpu") if trained else None, provenance)
    curve.write(plots)
    precision = Precision(params["train"]["precision"], device).name if trained else "fp32"
    # The base weights' description holds seeds and sizes: provenance, not metrics to diff.
    write_metrics(metrics, result, {**record(params, "teacher", precision=precision, device=device.type),
                                    "teacher_weights": provenance})
    print(f"teacher: heldout_loss {before['heldout_loss']:.4f} -> {after['heldout_loss']:.4f}, "
          f"denoise_mse {before['denoise_mse']:.4f} -> {after['denoise_mse']:.4f}, "
          f"sample_stats_error {before['sample_stats_error']:.4f} -> {after['sample_stats_error']:.4f} "
          f"({result['seconds']} s)")
    return result


def _provenance(params: dict, base) -> dict:
    weights_json = Path(base) / "weights.json"
    info = {"base": str(base), "trained_steps": params["teacher"]["steps"]}
    if weights_json.is_file():
        import json

        info["base_weights"] = json.loads(weights_json.read_text())
    if params["weights"]["source"] == "config":
        from osv.provenance import weights_description

        info["note"] = f"{weights_description(params)}; teacher trained here for {params['teacher']['steps']} steps"
    return info


def _protocol(params: dict) -> dict:
    res = params["data"]["resolution"]
    return {"eval_sigmas": list(EVAL_SIGMAS), "loss": "EDM lambda(sigma)-weighted MSE, sigma_data = 1",
            "denoise": f"{DENOISE_STEPS}-step Euler from sigma {DENOISE_FROM_SIGMA}, conditional, MSE per element",
            "samples": f"{SAMPLE_STEPS}-step Euler, CFG {SAMPLE_CFG}, per-channel mean/std/motion squared error",
            "split": "test", "clips": EVAL_CLIPS, "resolution": f"{res['width']}x{res['height']}", "seed": params["seed"]}


def command(args: argparse.Namespace) -> int:
    from osv.params import load_params

    params = load_params(args.params)
    kwargs = dict(params=params, base=args.base, vae=args.vae, latents=args.latents, out=args.out,
                  metrics=args.metrics, plots=args.plots)
    from osv.launch import run_stage

    run_stage("teacher", teacher_run, kwargs, params)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("teacher", help="Train (embedded) or link (paper) the SVD teacher; held-out metrics.")
    p.add_argument("--params", default="params.yaml", help="params file")
    p.add_argument("--base", default="models/base", help="SVD pipeline folder of the base weights")
    p.add_argument("--vae", default="models/vae", help="diffusers VAE folder (osv vae)")
    p.add_argument("--latents", default="data/latents", help="latents root (osv encode)")
    p.add_argument("--out", default="models/teacher", help="the teacher pipeline folder")
    p.add_argument("--metrics", default="metrics/teacher.json", help="metrics file")
    p.add_argument("--plots", default="plots/teacher.csv", help="training curves CSV")
    p.set_defaults(func=command)
