"""`osv encode` (GPU stage): clips -> VAE latents, conditioning latents and CLIP embeddings.

Output layout and tensors: docs/design.md "Latents". What is stored is exactly what
SVD's pipeline computes from a first frame: `image_embeds` as its `_encode_image`
(resize to 224 with antialiasing, CLIP normalisation), `cond_latents` as its
`_encode_vae_image` of the frame plus noise_aug_strength * eps (latent mode,
unscaled). Video `latents` are the VAE latent mode times scaling_factor.

Resumable: every shard is renamed into place when complete and carries a
fingerprint of what it was computed from; a rerun skips shards whose fingerprint
matches, unless the last complete index.json recorded a different content hash (SHA-256)
for it. index.json (with every shard's hash, checked when the shard is read) and stats.json
are written last.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from osv.atomic import atomic_path, write_json
from osv.hub import sha256_file
from osv.numerics import injected, require_finite

FRAME_CHUNK = 16  # frames per VAE call: bounds memory at paper resolution
CLIP_SIZE = 224  # SVD's _encode_image resizes the conditioning frame to 224 x 224


def groups(params: dict) -> list[tuple[str, int, int]]:
    """(split, width, height): train at both resolutions, test at data.resolution."""
    hi, lo = params["data"]["resolution"], params["data"]["low_resolution"]
    out = [("train", hi["width"], hi["height"]), ("train", lo["width"], lo["height"]),
           ("test", hi["width"], hi["height"])]
    return list(dict.fromkeys(out))  # low == high resolution gives one train group


def group_name(split: str, width: int, height: int) -> str:
    return f"{split}/{width}x{height}"


def clip_seed(seed: int, clip_id: str) -> int:
    """Seed of a clip's conditioning noise eps: fixed per clip, independent of batching."""
    return zlib.crc32(f"{seed}:{clip_id}".encode())


def autocast(device: str):
    """bf16 (or fp16) autocast on CUDA only; CPU stays fp32 so results are exact and repeatable."""
    if device != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def vae_mode(vae, x: torch.Tensor) -> torch.Tensor:
    """Latent mode of frames [N, 3, H, W] in [-1, 1], in chunks of FRAME_CHUNK frames; float32."""
    return torch.cat([vae.encode(x[i:i + FRAME_CHUNK]).latent_dist.mode().float()
                      for i in range(0, len(x), FRAME_CHUNK)])


def clip_image_embeds(image_encoder, feature_extractor, first: torch.Tensor) -> torch.Tensor:
    """SVD's `_encode_image` for uint8 frames [B, 3, H, W] -> [B, 1, D] float32."""
    from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import (
        _resize_with_antialiasing,
    )

    image = first.float() / 255.0
    # As the pipeline: normalise to [-1, 1] before resizing, back to [0, 1] after.
    image = (_resize_with_antialiasing(image * 2.0 - 1.0, (CLIP_SIZE, CLIP_SIZE)) + 1.0) / 2.0
    pixels = feature_extractor(images=image, do_normalize=True, do_center_crop=False, do_resize=False,
                               do_rescale=False, return_tensors="pt").pixel_values
    dtype = next(image_encoder.parameters()).dtype
    embeds = image_encoder(pixels.to(first.device, dtype)).image_embeds
    return embeds.float().unsqueeze(1)


@torch.no_grad()
def encode_batch(models: dict, frames: torch.Tensor, clip_ids: list[str], params: dict, device: str) -> dict:
    """uint8 frames [B, T, 3, H, W] -> the four stored tensors (CPU, float32 / uint8)."""
    vae = models["vae"]
    b, t = frames.shape[:2]
    x = frames.to(device).float() / 127.5 - 1.0
    first = x[:, 0]
    eps = torch.stack([torch.randn(first.shape[1:], generator=torch.Generator().manual_seed(
        clip_seed(params["seed"], cid))) for cid in clip_ids]).to(device)
    with autocast(device):
        latents = vae_mode(vae, x.flatten(0, 1)) * vae.config.scaling_factor
        cond = vae_mode(vae, first + params["conditioning"]["noise_aug_strength"] * eps)
        embeds = clip_image_embeds(models["image_encoder"], models["feature_extractor"], frames[:, 0].to(device))
    return {
        "latents": latents.view(b, t, *latents.shape[1:]).cpu().contiguous(),
        "cond_latents": cond.cpu().contiguous(),
        "image_embeds": embeds.cpu().contiguous(),
        "first_frame": frames[:, 0].cpu().contiguous(),
    }


def load_frames(clips: Path, rows: list[dict], params: dict, width: int, height: int) -> torch.Tensor:
    """uint8 [B, T, 3, H, W] through the shared clip loader."""
    from osv.video import load_clip

    d = params["data"]
    arr = np.stack([load_clip(clips / r["video"], d["frames"], d["fps"], width, height) for r in rows])
    return torch.from_numpy(arr).permute(0, 1, 4, 2, 3).contiguous()


def fingerprint(params: dict, models_id: str, width: int, height: int, clip_ids: list[str]) -> str:
    """What a shard depends on: the relevant params, the models, its size and its clips."""
    keys = {"seed": params["seed"], "frames": params["data"]["frames"], "fps": params["data"]["fps"],
            "noise_aug_strength": params["conditioning"]["noise_aug_strength"], "size": [width, height],
            "models": models_id, "clips": clip_ids}
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()


def shard_done(path: Path, fp: str) -> bool:
    from safetensors import safe_open

    if not path.exists():
        return False
    try:
        with safe_open(str(path), "pt") as f:
            return json.loads((f.metadata() or {}).get("osv", "{}")).get("fingerprint") == fp
    except Exception as exc:  # unreadable (foreign or corrupt) file: recompute it
        warnings.warn(f"{path}: unreadable ({exc}): encoding it again", stacklevel=2)
        return False


def reusable(path: Path, fp: str, old: dict | None) -> str | None:
    """SHA-256 of an existing shard computed from `fp`, else None (encode it)."""
    if not shard_done(path, fp):
        return None
    digest = sha256_file(path)
    # Only a hash recorded for this very computation (same fingerprint) says what the bytes must be.
    if old and old.get("fingerprint") == fp and old.get("sha256") not in (None, digest):
        warnings.warn(f"{path}: changed since `osv encode` wrote it (sha256 {digest}, index.json says "
                      f"{old['sha256']}): encoding it again", stacklevel=2)
        return None
    return digest


def encode_shard(models, clips: Path, rows, ids, params, width, height, device, path: Path, fp: str,
                 first: int = 0) -> str:
    """Write the shard (its clips start at `first` in the group); return its SHA-256."""
    from safetensors.torch import save_file

    bs = params["encode"]["batch_size"]
    parts = []
    for i in range(0, len(rows), bs):
        frames = load_frames(clips, rows[i:i + bs], params, width, height)
        parts.append(encode_batch(models, frames, ids[i:i + bs], params, device))
        batch = (first + i) // bs  # batch index within the split/resolution group
        require_finite("encode", {"latents": parts[-1]["latents"] * injected("encode", batch),
                                  "cond_latents": parts[-1]["cond_latents"]}, step=batch,
                       hint=f"clips {ids[i:i + bs]}; {path} not written")
    tensors = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    with atomic_path(path, suffix=".safetensors") as tmp:
        # One metadata key: safetensors orders several keys differently from run to run.
        meta = json.dumps({"fingerprint": fp, "clip_ids": ids}, sort_keys=True)
        save_file(tensors, str(tmp), metadata={"osv": meta})
        return sha256_file(tmp)


def encode_group(models, clips: Path, out: Path, params: dict, split: str, width: int, height: int,
                 device: str, counts: dict, previous: dict | None = None) -> dict:
    """All shards of one split/resolution; returns its index entry. `previous`: this group's
    entry in the last complete index.json, if any."""
    from osv.data import clip_id, read_manifest

    rows = read_manifest(clips / "manifest.csv", split)
    if not rows:
        raise ValueError(f"{clips}/manifest.csv: no '{split}' clips to encode")
    size = params["encode"]["shard_size"]
    folder = out / group_name(split, width, height)
    old = {s["file"]: s for s in (previous or {}).get("shards", [])}
    shards = []
    for k in tqdm(range(0, len(rows), size), desc=f"encode {group_name(split, width, height)}", unit="shard"):
        chunk = rows[k:k + size]
        ids = [clip_id(r) for r in chunk]
        path = folder / f"shard-{k // size:05d}.safetensors"
        fp = fingerprint(params, models["id"], width, height, ids)
        digest = reusable(path, fp, old.get(path.name))
        if digest:
            counts["skipped"] += 1
        else:
            digest = encode_shard(models, clips, chunk, ids, params, width, height, device, path, fp, k)
            counts["encoded"] += 1
        shards.append({"file": path.name, "clip_ids": ids, "count": len(ids), "fingerprint": fp,
                       "sha256": digest})
    return {"split": split, "width": width, "height": height, "folder": group_name(split, width, height),
            "count": len(rows), "shards": shards}


def load_models(base: Path, vae: Path, device: str) -> dict:
    from transformers import CLIPImageProcessor

    from osv.models import load_image_encoder, load_vae

    files = sorted(vae.glob("*.safetensors")) + sorted((base / "image_encoder").glob("*.safetensors"))
    digest = hashlib.sha256()
    for f in files:  # name and size: cheap, catches a retrained or swapped model
        digest.update(f"{f.name}:{f.stat().st_size}".encode())
    return {"vae": load_vae(vae).to(device).eval(),
            "image_encoder": load_image_encoder(base).to(device).eval(),
            "feature_extractor": CLIPImageProcessor.from_pretrained(str(base / "feature_extractor")),
            "id": digest.hexdigest()}


@torch.no_grad()
def group_stats(folder: Path, entry: dict) -> dict:
    """Mean/std of the stored (scaled) latents of one group, overall and per channel."""
    from osv.latents import load_shard

    lat = torch.cat([load_shard(folder / s["file"], s["sha256"])["latents"] for s in entry["shards"]]).double()
    per_channel = lat.transpose(0, 2).flatten(1)
    return {"mean": float(lat.mean()), "std": float(lat.std()), "channel_mean": per_channel.mean(1).tolist(),
            "channel_std": per_channel.std(1).tolist(), "count": entry["count"]}


INDEX, PREVIOUS_INDEX = "index.json", ".index.previous.json"


def set_index_aside(out: Path) -> dict:
    """The last complete run's shard entries (their hashes decide which shards are reused), with
    its index moved aside: while shards are rewritten the folder must not look complete. The
    shards themselves stay (a failed or killed encode keeps every shard it wrote)."""
    out.mkdir(parents=True, exist_ok=True)
    if (out / INDEX).exists():
        os.replace(out / INDEX, out / PREVIOUS_INDEX)
    try:
        return json.loads((out / PREVIOUS_INDEX).read_text())["groups"]
    except (OSError, ValueError, KeyError):
        return {}


def encode_all(params: dict, clips: str, base: str, vae: str, out: str) -> dict:
    """The stage's work function (module level, so submitit can pickle it)."""
    clips, base, vae, out = Path(clips), Path(base), Path(vae), Path(out)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    models = load_models(base, vae, device)
    counts = {"encoded": 0, "skipped": 0}
    previous = set_index_aside(out)
    entries = {group_name(s, w, h): encode_group(models, clips, out, params, s, w, h, device, counts,
                                                 previous.get(group_name(s, w, h)))
               for s, w, h in groups(params)}
    index = {"frames": params["data"]["frames"], "fps": params["data"]["fps"],
             "scaling_factor": float(models["vae"].config.scaling_factor),
             "noise_aug_strength": params["conditioning"]["noise_aug_strength"],
             "latent_channels": int(models["vae"].config.latent_channels),
             "image_embed_dim": int(models["image_encoder"].config.projection_dim),
             "groups": entries}
    write_json(out / "stats.json", {name: group_stats(out / name, e) for name, e in entries.items()})
    write_json(out / INDEX, index)  # last: its presence means the folder is complete
    (out / PREVIOUS_INDEX).unlink(missing_ok=True)
    return {"device": device, **counts, "groups": {k: e["count"] for k, e in entries.items()}}


def _command(args) -> int:
    from osv.launch import run_stage
    from osv.params import load_params

    params = load_params(args.params)
    kwargs = dict(params=params, clips=args.clips, base=args.base, vae=args.vae, out=args.out)
    result = run_stage("encode", encode_all, kwargs, params)
    print(f"osv encode: {args.out}: {result}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("encode", help="encode clips to latents, conditioning latents and CLIP embeddings")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--clips", default="data/clips")
    p.add_argument("--base", default="models/base")
    p.add_argument("--vae", default="models/vae")
    p.add_argument("--out", default="data/latents")
    p.set_defaults(func=_command)
