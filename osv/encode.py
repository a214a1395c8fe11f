"""`osv encode` (GPU stage): clips -> VAE latents, conditioning latents and CLIP embeddings.

Output layout and tensors: docs/design.md "Latents". What is stored is exactly what
SVD's pipeline computes from a first frame: `image_embeds` as its `_encode_image`
(resize to 224 with antialiasing, CLIP normalisation), `cond_latents` as its
`_encode_vae_image` of the frame plus noise_aug_strength * eps (latent mode,
unscaled). Video `latents` are the VAE latent mode times scaling_factor.

Resumable: every shard is renamed into place when complete and carries a
fingerprint of what it was computed from; a rerun skips shards whose fingerprint
matches, unless the last complete index.json recorded a different content hash (SHA-256)
for it. index.json (with every shard's hash, checked when the shard is read) is written last.

Fan-out (paper scale: ~65K clips): the work is cut into units of encode.shard_size clips of one
split, each one shard file per resolution of its split, encoded from one decode per clip (the
train split at both resolutions). Job `part` of resources.encode.jobs takes a contiguous range of
units and writes a receipt (data/latents.parts/part-K-of-N.json: its shard entries and hashes);
the gather writes index.json from the receipts. Which job encodes a shard changes nothing in it.
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
from osv.fanout import part_range, read_receipts
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
    from osv.precision import cuda_autocast

    return cuda_autocast(device)[0]


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


def load_frames(clips: Path, rows: list[dict], params: dict, sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """uint8 [B, T, 3, H, W] per (width, height) of `sizes`, each clip decoded once."""
    from osv.video import load_clip_sizes

    d = params["data"]
    per_clip = [load_clip_sizes(clips / r["video"], d["frames"], d["fps"], sizes) for r in rows]
    return [torch.from_numpy(np.stack([c[j] for c in per_clip])).permute(0, 1, 4, 2, 3).contiguous()
            for j in range(len(sizes))]


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


def encode_rows(models, clips: Path, rows, ids, params, sizes, device, first: int, where: str) -> list[dict]:
    """The stored tensors of `rows` at every (width, height) of `sizes`; `first`: the rows' start in
    their split (batch indices count from there)."""
    bs = params["encode"]["batch_size"]
    parts = [[] for _ in sizes]
    for i in range(0, len(rows), bs):
        batch = (first + i) // bs  # batch index within the split
        for j, frames in enumerate(load_frames(clips, rows[i:i + bs], params, sizes)):
            parts[j].append(encode_batch(models, frames, ids[i:i + bs], params, device))
            require_finite("encode", {"latents": parts[j][-1]["latents"] * injected("encode", batch),
                                      "cond_latents": parts[j][-1]["cond_latents"]}, step=batch,
                           hint=f"clips {ids[i:i + bs]}; {where} not written")
    return [{k: torch.cat([p[k] for p in per_size]) for k in per_size[0]} for per_size in parts]


def save_shard(path: Path, tensors: dict, fp: str, ids: list[str]) -> str:
    """Write the shard atomically; return its SHA-256."""
    from safetensors.torch import save_file

    with atomic_path(path, suffix=".safetensors") as tmp:
        # One metadata key: safetensors orders several keys differently from run to run.
        meta = json.dumps({"fingerprint": fp, "clip_ids": ids}, sort_keys=True)
        save_file(tensors, str(tmp), metadata={"osv": meta})
        return sha256_file(tmp)


# ----------------------------------------------------------------- the work units and their jobs

def units(params: dict, clips: Path) -> list[tuple[str, int, list[dict]]]:
    """(split, shard index, manifest rows): encode.shard_size clips of one split each. A unit is
    one shard file per resolution of its split (train: both), encoded from one decode per clip."""
    from osv.data import read_manifest

    size = params["encode"]["shard_size"]
    out = []
    for split in dict.fromkeys(s for s, _, _ in groups(params)):
        rows = read_manifest(clips / "manifest.csv", split)
        if not rows:
            raise ValueError(f"{clips}/manifest.csv: no '{split}' clips to encode")
        out += [(split, k // size, rows[k:k + size]) for k in range(0, len(rows), size)]
    return out


def receipt_path(out: Path, part: int, jobs: int) -> Path:
    """data/latents.parts/part-K-of-N.json: beside the folder, not in it (a receipt holds the job's
    timing, and DVC hashes data/latents as the input of every later stage)."""
    out = Path(out)
    return out.with_name(f"{out.name}.parts") / f"part-{part:03d}-of-{jobs:03d}.json"


def encode_unit(models, clips: Path, out: Path, params: dict, split: str, k: int, rows: list[dict],
                device: str, previous: dict, counts: dict) -> dict:
    """Shard k of `split` at each of its resolutions (intact shards reused); {group: shard entry}."""
    from osv.data import clip_id

    ids = [clip_id(r) for r in rows]
    entries, todo = {}, []
    for s, w, h in groups(params):
        if s != split:
            continue
        name = group_name(s, w, h)
        path = out / name / f"shard-{k:05d}.safetensors"
        fp = fingerprint(params, models["id"], w, h, ids)
        old = {e["file"]: e for e in previous.get(name, {}).get("shards", [])}.get(path.name)
        entries[name] = {"file": path.name, "clip_ids": ids, "count": len(ids), "fingerprint": fp,
                         "sha256": reusable(path, fp, old)}
        if entries[name]["sha256"] is None:
            todo.append((name, w, h, path, fp))
    counts["skipped"] += len(entries) - len(todo)
    if todo:
        where = ", ".join(str(t[3]) for t in todo)
        tensors = encode_rows(models, clips, rows, ids, params, [(w, h) for _, w, h, _, _ in todo], device,
                              k * params["encode"]["shard_size"], where)
        for (name, _, _, path, fp), t in zip(todo, tensors):
            entries[name]["sha256"] = save_shard(path, t, fp, ids)
        counts["encoded"] += len(todo)
    return entries


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


INDEX, PREVIOUS_INDEX = "index.json", ".index.previous.json"


def set_index_aside(out: Path) -> dict:
    """The last complete run's groups (their shard hashes decide which shards are reused), with its
    index moved aside: while shards are rewritten the folder must not look complete. The shards
    themselves stay (a failed or killed encode keeps every shard it wrote). Every part job calls
    this; whichever comes first moves the index, the others read the moved copy."""
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.replace(out / INDEX, out / PREVIOUS_INDEX)
    try:
        return json.loads((out / PREVIOUS_INDEX).read_text())["groups"]
    except (OSError, ValueError, KeyError):
        return {}


def encode_part(params: dict, clips: str, base: str, vae: str, root: str, part: int, jobs: int) -> dict:
    """Job `part` of `jobs`: its range of units, then its receipt (the shard entries it vouches for,
    the models' sizes and its timing). Module level, so submitit can pickle it."""
    from osv import timing

    clips, base, vae, out = Path(clips), Path(base), Path(vae), Path(root)
    plan = units(params, clips)
    mine = [plan[i] for i in part_range(len(plan), part, jobs)]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    previous = set_index_aside(out)
    receipt_path(out, part, jobs).unlink(missing_ok=True)
    models = load_models(base, vae, device)
    counts = {"encoded": 0, "skipped": 0}
    shards = [{"split": split, "shard": k, "entries": encode_unit(models, clips, out, params, split, k, rows,
                                                                  device, previous, counts)}
              for split, k, rows in tqdm(mine, desc=f"encode part {part + 1}/{jobs}", unit="shard")]
    receipt = {"part": part, "jobs": jobs, "units": len(plan), "device": device, **counts, "shards": shards,
               "scaling_factor": float(models["vae"].config.scaling_factor),
               "latent_channels": int(models["vae"].config.latent_channels),
               "image_embed_dim": int(models["image_encoder"].config.projection_dim),
               "timing": timing.measure()}
    write_json(receipt_path(out, part, jobs), receipt)
    return {k: receipt[k] for k in ("part", "jobs", "device", "encoded", "skipped")}


# what a finished job leaves (osv.launch reuses a completed job only while it exists)
encode_part.outputs = lambda root, part, jobs, **_: [receipt_path(root, part, jobs)]


def gather(params: dict, clips: str, out: str, jobs: int) -> dict:
    """index.json from the receipts of all `jobs` parts (together they must hold every unit), written
    last: its presence means the folder is complete. Its timing record sums the parts'."""
    from osv import timing

    clips, out = Path(clips), Path(out)
    receipts = read_receipts([receipt_path(out, k, jobs) for k in range(jobs)], "encode", "osv encode")
    done = {(s["split"], s["shard"]): s["entries"] for r in receipts for s in r["shards"]}
    plan = units(params, clips)
    missing = [f"{split} shard {k}" for split, k, _ in plan if (split, k) not in done]
    if missing or len(done) != len(plan):
        raise ValueError(f"{receipt_path(out, 0, jobs).parent}: the receipts of {jobs} jobs do not cover the {len(plan)} units of "
                         f"{clips}/manifest.csv (missing: {', '.join(missing[:5]) or 'none'}): rerun the parts")
    entries = {}
    for split, w, h in groups(params):
        name = group_name(split, w, h)
        shards = [done[(s, k)][name] for s, k, _ in plan if s == split]
        entries[name] = {"split": split, "width": w, "height": h, "folder": name,
                         "count": sum(e["count"] for e in shards), "shards": shards}
    first = receipts[0]
    index = {"frames": params["data"]["frames"], "fps": params["data"]["fps"],
             "scaling_factor": first["scaling_factor"],
             "noise_aug_strength": params["conditioning"]["noise_aug_strength"],
             "latent_channels": first["latent_channels"], "image_embed_dim": first["image_embed_dim"],
             "groups": entries}
    write_json(out / INDEX, index)  # last: its presence means the folder is complete
    (out / PREVIOUS_INDEX).unlink(missing_ok=True)
    timing.record_parts("encode", out, [r["timing"] for r in receipts])
    return {"device": first["device"], "encoded": sum(r["encoded"] for r in receipts),
            "skipped": sum(r["skipped"] for r in receipts), "jobs": jobs,
            "groups": {k: e["count"] for k, e in entries.items()}}


def encode_all(params: dict, clips: str, base: str, vae: str, out: str, jobs: int = 1) -> dict:
    """Every part in this process, then the index."""
    for part in range(jobs):
        encode_part(params, clips, base, vae, out, part, jobs)
    return gather(params, clips, out, jobs)


def command(args) -> int:
    from osv.launch import run_stage, run_stages
    from osv.params import load_params, resources_for

    params = load_params(args.params)
    jobs = resources_for(params, "encode")["jobs"]
    if args.part is not None and not 0 <= args.part < jobs:
        raise SystemExit(f"osv encode: --part {args.part} is not in 0..{jobs - 1} (resources.encode.jobs = {jobs})")
    common = dict(params=params, clips=args.clips, base=args.base, vae=args.vae, root=args.out, jobs=jobs)
    if args.part is not None:  # one job of the fan-out (Snakemake's encode_part rule)
        result = run_stage("encode", encode_part, {**common, "part": args.part}, params)
    else:
        if not args.gather:  # every part, submitted at once (dvc repro, or by hand)
            run_stages("encode", encode_part, [{**common, "part": k} for k in range(jobs)], params)
        result = gather(params, args.clips, args.out, jobs)
    print(f"osv encode: {args.out}: {result}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("encode", help="encode clips to latents, conditioning latents and CLIP embeddings")
    p.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    p.add_argument("--clips", default="data/clips", help="the data stage's clips (default: %(default)s)")
    p.add_argument("--base", default="models/base", help="base models: the CLIP image encoder (default: %(default)s)")
    p.add_argument("--vae", default="models/vae", help="the VAE that encodes (default: %(default)s)")
    p.add_argument("--out", default="data/latents", help="latent folder (default: %(default)s)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--part", type=int, default=None,
                     help="encode only job PART (0-based) of resources.encode.jobs and write its receipt "
                          "(default: every part, then the index)")
    how.add_argument("--gather", action="store_true", help="only write index.json from the parts' receipts")
    p.set_defaults(func=command)
