"""`osv generate`: one clip per test clip for one method of eval.methods.

Each clip starts from its test clip's first frame (the stored CLIP embedding and
noise-augmented first-frame latent), with noise from a generator seeded by
(eval.seed, batch index), so a method's videos are the same on every run. Every
sampler's first draw is x_T = sigma_max * eps with that generator and the latents' shape
(the teacher with init_noise="edm"), so sample i of every method starts from the same
noise and the same first frame: the report's teacher-ODE match compares them.
Writes samples/M/clip-XXXX.mp4, meta.json (NFE, seconds per video, seeds, the
hashes of the weights; for a trained student the guidance absorption, see
guidance_absorption) and the previews (preview.gif, contact.png).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch
from tqdm import tqdm

from osv import models
from osv.atomic import atomic_path, write_json
from osv.conditioning import from_batch
from osv.launch import run_stage
from osv.numerics import injected, require_finite
from osv.params import load_params
from osv.samplers import (
    _randn,
    consistency_sample,
    consistency_sigmas,
    decode_latents,
    guidance_ramp,
    teacher_sample,
    tts_sample,
)
from osv.sde import Denoiser, karras_sigmas, unet_network

UNET_FILE = "diffusion_pytorch_model.safetensors"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sample(method: dict, denoiser: Denoiser, cond, shape, generator, params: dict):
    """Dispatch to the method's sampler; returns SampleResult(latents, nfe)."""
    sde = params["sde"]
    grid = dict(sigma_min=sde["sigma_min"], sigma_max=sde["sigma_max"], rho=sde["rho"])
    if method["sampler"] == "teacher":  # init "edm": x_T = sigma_max eps, the students' x_T (ODE match)
        return teacher_sample(denoiser, cond, shape, steps=method["steps"], cfg=method.get("cfg", 1.0),
                              generator=generator, init_noise="edm", **grid)
    if method["sampler"] == "consistency":
        return consistency_sample(denoiser, cond, shape, steps=method["steps"], cfg=method.get("cfg"),
                                  generator=generator, num_sigmas=sde["num_sigmas"], **grid)
    return tts_sample(denoiser, cond, shape, generator=generator, third_eval=method.get("tts_third_eval", False),
                      num_sigmas=sde["num_sigmas"], **grid)


def sigma_max_input(shape, generator, params: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, sigma_max): the 1-step consistency sampler's input sigma_max * eps, eps its first draw
    from `generator` (every sampler's first draw; consistency_sample computes x exactly so)."""
    sde = params["sde"]
    grid = karras_sigmas(sde["num_sigmas"], sde["sigma_min"], sde["sigma_max"], sde["rho"])
    sigma = consistency_sigmas(grid, 1)[0].to(torch.float32)
    return sigma.to(device) * _randn(shape, generator, device, torch.float32), sigma


@torch.no_grad()
def guidance_absorption(student: Denoiser, teacher: Denoiser, x: torch.Tensor, sigma, cond, cfg):
    """Per clip (numerator, denominator) of the share of the teacher's CFG shift the student
    reproduces at (x, sigma): <f_theta - D, D^ - D> and ||D^ - D||^2 (float64, summed over each
    clip), D the teacher's conditional (cfg 1) denoiser, D^ = D(c0) + w (D(c) - D(c0)) its guided
    one (Denoiser.guided's formula, so D^ - D = (w - 1)(D(c) - D(c0))), f_theta the student's
    consistency function. The share (ratio of sums) is 0 when the student equals the unguided
    teacher, 1 when it absorbed the guidance. 3 network evaluations: f_theta, D(c), D(c0)."""
    d_cond = teacher.denoise(x, sigma, cond)
    d_uncond = teacher.denoise(x, sigma, cond.uncond())
    w = torch.as_tensor(cfg, dtype=x.dtype, device=x.device)
    w = w.reshape(1, -1, *[1] * (x.ndim - 2)) if w.ndim == 1 else w  # per frame [T]
    shift = ((w - 1) * (d_cond - d_uncond)).double()
    gap = (student.consistency_fn(x, sigma, cond) - d_cond).double()
    return (gap * shift).flatten(1).sum(1), shift.square().flatten(1).sum(1)


def absorption_meta(numerators: list[float], denominators: list[float], sigma: float, acd_cfg: dict) -> dict:
    """meta.json keys: the share over all clips (None when the teacher has no CFG shift), the sums,
    the per-clip terms (the report bootstraps the ratio over clips) and what was measured."""
    num, den = float(sum(numerators)), float(sum(denominators))
    share = num / den if den > 0 and abs(num) < float("inf") else None
    return {"absorption": share, "absorption_sums": {"numerator": num, "denominator": den},
            "absorption_per_clip": {"numerator": numerators, "denominator": denominators},
            "absorption_probe": f"<f_theta - D, D^ - D> / ||D^ - D||^2 at x = sigma_max eps (the 1-step sampler's "
                                f"input, its noise), sigma_max = {sigma:g}, D^ with guidance linspace("
                                f"{acd_cfg['min']:g}, {acd_cfg['max']:g}, frames) (acd.cfg)"}


def generate(params: dict, method_name: str, teacher: str, model: str, latents: str, out: str) -> dict:
    from osv.latents import LatentDataset
    from osv.video import tensor_to_uint8, write_mp4

    method = params["eval"]["methods"][method_name]
    ev, data = params["eval"], params["data"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    res = data["resolution"]
    dataset = LatentDataset(latents, "test", res["width"], res["height"])
    count = min(ev["num_clips"], len(dataset))
    if count < ev["num_clips"]:
        print(f"[osv generate] only {count} test clips in {latents} (eval.num_clips = {ev['num_clips']})")
    unet_dir = Path(model) / "unet"
    unet = models.load_unet(unet_dir).to(device).eval()
    vae = models.load_vae(teacher).to(device).eval()
    denoiser = Denoiser(unet_network(unet), sigma_min=params["sde"]["sigma_min"],
                        boundary="approx" if method["model"] == "teacher" else params["student"]["boundary"])
    # A trained student: how much of the teacher's guidance it absorbed (guidance_absorption).
    probe = None if method["model"] == "teacher" else \
        Denoiser(unet_network(models.load_unet(teacher).to(device).eval()), sigma_min=params["sde"]["sigma_min"])
    acd_cfg = params["acd"]["cfg"]
    guidance = guidance_ramp(acd_cfg["max"], data["frames"], acd_cfg["min"])
    numerators, denominators, probe_sigma = [], [], None

    meta = {"method": method_name, **method, "clips": count, "frames": data["frames"], "fps": data["fps"],
            "resolution": [res["width"], res["height"]], "seed": ev["seed"], "batch_size": ev["batch_size"],
            "unet_sha256": sha256(unet_dir / UNET_FILE), "model": str(model),
            "teacher_unet_sha256": sha256(Path(teacher) / "unet" / UNET_FILE),
            "weights": _provenance(params), "device": device}
    seconds, nfe, clip_ids = 0.0, set(), []
    with atomic_path(out) as tmp:
        tmp.mkdir()
        for b, start in enumerate(tqdm(range(0, count, ev["batch_size"]), desc=f"generate {method_name}")):
            items = [dataset[i] for i in range(start, min(start + ev["batch_size"], count))]
            clip_ids += [str(it["clip_id"]) for it in items]
            batch = {k: torch.stack([it[k] for it in items]) for k in ("latents", "cond_latents", "image_embeds")}
            cond = from_batch(batch, params, device=device)
            batch_seed = ev["seed"] * 100_003 + b  # the same for every method: sample i of each starts alike
            generator = torch.Generator(device).manual_seed(batch_seed)
            t0 = time.perf_counter()
            result = sample(method, denoiser, cond, batch["latents"].shape, generator, params)
            require_finite("generate", {"latents": result.latents * injected("generate", b)}, step=b,
                           hint=f"clips {clip_ids[-len(items):]}; {out} not written")
            frames = decode_latents(vae, result.latents, chunk=data["frames"])
            seconds += time.perf_counter() - t0
            nfe.add(result.nfe)
            for k, clip in enumerate(frames):
                write_mp4(tmp / f"clip-{start + k:04d}.mp4", tensor_to_uint8(clip), data["fps"])
            if probe is not None:  # not timed: no part of sampling
                x, probe_sigma = sigma_max_input(batch["latents"].shape, torch.Generator(device).manual_seed(batch_seed),
                                                 params, device)
                num, den = guidance_absorption(denoiser, probe, x, probe_sigma, cond, guidance)
                numerators += num.tolist()
                denominators += den.tolist()
        meta.update(nfe=nfe.pop() if len(nfe) == 1 else sorted(nfe), sec_per_video=seconds / max(count, 1),
                    clip_ids=clip_ids)
        if probe is not None:
            meta.update(absorption_meta(numerators, denominators, float(probe_sigma), acd_cfg))
        write_json(tmp / "meta.json", meta)
        from osv.eval.previews import make_previews

        make_previews(tmp)
    absorbed = f", guidance absorption {meta['absorption']:.3f}" if meta.get("absorption") is not None else ""
    print(f"[osv generate] {method_name}: {count} clips, NFE {meta['nfe']}, {meta['sec_per_video']:.3f} s/video"
          f"{absorbed}")
    return meta


def _provenance(params: dict) -> str:
    if params["weights"]["source"] == "config":
        return "small models built from configs and trained here (embedded scale), not SVD"
    return f"{params['weights']['teacher']['repo_id']}@{params['weights']['teacher']['revision']}"


def command(args) -> int:
    params = load_params(args.params)
    if args.method not in params["eval"]["methods"]:
        raise SystemExit(f"osv generate: unknown method {args.method!r} (eval.methods: {sorted(params['eval']['methods'])})")
    for path in (args.teacher, args.model, args.latents):
        if not Path(path).exists():
            raise SystemExit(f"osv generate: {path} does not exist")
    kwargs = dict(params=params, method_name=args.method, teacher=args.teacher, model=args.model,
                  latents=args.latents, out=args.out)
    run_stage("generate", generate, kwargs, params)
    return 0


def register(sub) -> None:
    p = sub.add_parser("generate", help="sample the test set for one method of eval.methods")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--method", required=True)
    p.add_argument("--teacher", default="models/teacher", help="teacher pipeline folder (its VAE decodes)")
    p.add_argument("--model", required=True, help="models/teacher or models/RUN (a folder with unet/)")
    p.add_argument("--latents", default="data/latents")
    p.add_argument("--out", required=True)
    p.set_defaults(func=command)
