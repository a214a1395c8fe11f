"""`osv generate`: one clip per test clip for one method of eval.methods.

Each clip starts from its test clip's first frame (the stored CLIP embedding and
noise-augmented first-frame latent), with noise from a generator seeded by
(eval.seed, batch index), so a method's videos are the same on every run.
Writes samples/M/clip-XXXX.mp4, meta.json (NFE, seconds per video, seeds, the
hashes of the weights) and the previews (preview.gif, contact.png).
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
from osv.samplers import consistency_sample, decode_latents, teacher_sample, tts_sample
from osv.sde import Denoiser, unet_network

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
    if method["sampler"] == "teacher":
        return teacher_sample(denoiser, cond, shape, steps=method["steps"], cfg=method.get("cfg", 1.0),
                              generator=generator, **grid)
    if method["sampler"] == "consistency":
        return consistency_sample(denoiser, cond, shape, steps=method["steps"], cfg=method.get("cfg"),
                                  generator=generator, num_sigmas=sde["num_sigmas"], **grid)
    return tts_sample(denoiser, cond, shape, generator=generator, third_eval=method.get("tts_third_eval", False),
                      num_sigmas=sde["num_sigmas"], **grid)


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
    denoiser = Denoiser(unet_network(unet), sigma_min=params["sde"]["sigma_min"])

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
            generator = torch.Generator(device).manual_seed(ev["seed"] * 100_003 + b)
            t0 = time.perf_counter()
            result = sample(method, denoiser, cond, batch["latents"].shape, generator, params)
            require_finite("generate", {"latents": result.latents * injected("generate", b)}, step=b,
                           hint=f"clips {clip_ids[-len(items):]}; {out} not written")
            frames = decode_latents(vae, result.latents, chunk=data["frames"])
            seconds += time.perf_counter() - t0
            nfe.add(result.nfe)
            for k, clip in enumerate(frames):
                write_mp4(tmp / f"clip-{start + k:04d}.mp4", tensor_to_uint8(clip), data["fps"])
        meta.update(nfe=nfe.pop() if len(nfe) == 1 else sorted(nfe), sec_per_video=seconds / max(count, 1),
                    clip_ids=clip_ids)
        write_json(tmp / "meta.json", meta)
        from osv.eval.previews import make_previews

        make_previews(tmp)
    print(f"[osv generate] {method_name}: {count} clips, NFE {meta['nfe']}, {meta['sec_per_video']:.3f} s/video")
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
