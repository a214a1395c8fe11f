"""`osv weights`: the base models every later stage starts from (models/base).

weights.source == "config" (offline): randomly initialised models from a fixed seed
(weights.config_seed), saved part by part as save_pretrained saves a pipeline. The
weights.architecture small (embedded scale): the small pipeline and DINOv2 of osv/configs.
svd (paper-smoke scale): SVD img2vid's real architecture (UNet 1.5B, VAE, CLIP ViT-H/14
image encoder, scheduler, feature extractor) and DINOv2-small's, from the configs in
osv.models, NOT the real weights; one model in memory at a time (the UNet is 6.1 GB fp32).
weights.source == "hub" (paper scale): SVD img2vid, DINOv2 and StyleGAN-V's I3D at pinned
revisions, through osv.hub (resumable, every file checked against the hub's SHA-256), and
the FID Inception v3 weights (pytorch-fid's pt_inception-2015-12-05-6726825d.pth) checked
against weights.inception.sha256. This is the only stage that needs the network (besides
the data stage's OpenVid download): fvd and the rest read models/base. SVD img2vid is a
gated repository: accept its licence on the hub and give huggingface_hub a read token
(`hf auth login`, or HF_TOKEN in the environment); README.md, "Running on a SLURM cluster".
We take SVD's fp32 diffusers files (not the fp16 variant): every stage loads the folder
with a plain from_pretrained and trains in fp32 master weights (autocast does the rest);
about 9 GB. Either way models/base/weights.json says what each part is.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from tqdm import tqdm

from osv.atomic import atomic_path, write_json
from osv.params import ParamsError, load_params

TEACHER_FILES = [
    "model_index.json",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    "image_encoder/config.json", "image_encoder/model.safetensors",
    "feature_extractor/*", "scheduler/*",
]
DINOV2_FILES = ["config.json", "model.safetensors", "preprocessor_config.json"]
RANDOM_INIT = "random init (NOT the real SVD/DINOv2 weights)"
SVD_RANDOM_NOTE = "SVD img2vid architecture, random init (NOT the real SVD/DINOv2 weights)"
# part -> (small config name, seed offset from weights.config_seed); offsets as in build_small_pipeline
SMALL_PARTS = {"vae": ("vae", 0), "image_encoder": ("clip", 1), "unet": ("unet", 2), "dinov2": ("dinov2", 3)}
# weights.architecture svd: part -> where its config is written down (osv.models)
SVD_PARTS = {"vae": "osv.models.SVD_VAE (SVD img2vid vae/config.json)",
             "image_encoder": "osv.models.SVD_IMAGE_ENCODER (SVD img2vid image_encoder/config.json, CLIP ViT-H/14)",
             "unet": "osv.models.svd_unet_config() (diffusers' default = SVD img2vid unet/config.json)",
             "dinov2": "osv.models.DINOV2_SMALL (facebook/dinov2-small config.json)"}
COMMIT = re.compile(r"^[0-9a-f]{40}$")
# torch hub's convention (torch.hub.HASH_REGEX): `<name>-<first hex digits of the SHA-256>.<ext>`
HASH_SUFFIX = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")
INCEPTION_FILE = "inception/pt_inception.pth"  # models/base/<this>; osv.eval.features reads it


def register(subparsers) -> None:
    p = subparsers.add_parser("weights", help="Base models: small models from configs, or pinned hub weights.")
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--out", default="models/base", help="output folder (default: models/base)")
    p.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    build_base(params, Path(args.out))
    return 0


def build_base(params: dict, out: Path) -> dict:
    """Write models/base (pipeline folder + dinov2/ [+ i3d/ + inception/] + weights.json) atomically."""
    source = params["weights"]["source"]
    if source == "hub":
        check_pins(params["weights"])
    with atomic_path(out) as tmp:
        info = from_config(params, tmp) if source == "config" else from_hub(params["weights"], tmp)
        write_json(tmp / "weights.json", info)
    return info


def check_pins(w: dict) -> None:
    for key in ("teacher", "dinov2"):
        if not COMMIT.match(w[key]["revision"]):
            raise ParamsError(f"weights.{key}.revision: '{w[key]['revision']}' is not a 40-hex commit; "
                              "pin the exact hub commit so the weights cannot change under you")


def safetensors_files(folder: Path) -> dict[str, dict]:
    """SHA-256 and parameter count of every .safetensors file below `folder` (read from its header)."""
    from safetensors import safe_open

    from osv.hub import sha256_file

    out = {}
    for path in sorted(folder.rglob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            params = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
        out[str(path.relative_to(folder))] = {"sha256": sha256_file(path), "parameters": params}
    return out


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def from_config(params: dict, tmp: Path) -> dict:
    """Build, save and free one part at a time: the pipeline folder (model_index.json, scheduler/,
    feature_extractor/, vae/, image_encoder/, unet/) and dinov2/, the files save_pretrained writes."""
    import gc

    from osv import models

    arch = params["weights"]["architecture"]
    seed, frames = params["weights"]["config_seed"], params["data"]["frames"]
    build = models.BUILDERS[arch]
    models.pipeline_index(tmp)
    models.build_scheduler().save_pretrained(str(tmp / "scheduler"))
    models.build_feature_extractor().save_pretrained(str(tmp / "feature_extractor"))
    parts = {}
    for part, (config, offset) in SMALL_PARTS.items():
        module = build[part](seed + offset, frames) if part == "unet" else build[part](seed + offset)
        module.save_pretrained(str(tmp / part))
        count = models.count_parameters(module)
        del module
        gc.collect()
        files = {f"{part}/{k}": v for k, v in safetensors_files(tmp / part).items()}
        if arch == "small":
            parts[part] = {
                "description": f"built from osv/configs/small_{config}.json, seed {seed + offset}, {RANDOM_INIT}",
                "config": f"osv/configs/small_{config}.json", "seed": seed + offset, "init": "random",
                "parameters": count, "files": files}
        else:
            parts[part] = {"description": f"{SVD_RANDOM_NOTE}: built from {SVD_PARTS[part]}, seed {seed + offset}",
                           "config": SVD_PARTS[part].split(" ", 1)[0], "seed": seed + offset, "init": "random",
                           "parameters": count, "files": files}
    if arch == "small":
        return {"source": "config", "num_frames": frames, "parts": parts,
                "note": "Embedded scale: small randomly initialised models, NOT the real SVD/DINOv2 weights."}
    return {"source": "config", "architecture": "svd", "num_frames": frames, "parts": parts,
            "note": f"{SVD_RANDOM_NOTE}. Paper-smoke scale: the paper's architecture through every stage to "
                    "test the pipeline, never a result."}


def fetch_repo(ref: dict, patterns: list[str], dest: Path) -> dict:
    """Download the files of a model repo matching `patterns` at its pinned commit into `dest`."""
    from osv.hub import fetch_file, link_or_copy, list_files, resolve_commit

    repo_id, revision = ref["repo_id"], ref["revision"]
    commit = resolve_commit(repo_id, "model", revision, None, patterns[0])
    files = list_files(repo_id, "model", commit, None, patterns)
    missing = [p for p in patterns if "*" not in p and p not in {f.path for f in files}]
    if missing:
        raise FileNotFoundError(f"model {repo_id}@{commit}: missing {', '.join(missing)}")
    record = {}
    for remote in tqdm(files, desc=repo_id, unit="file"):
        path, digest = fetch_file(repo_id, "model", commit, None, remote)
        link_or_copy(path, dest / remote.path)
        record[remote.path] = {"sha256": digest, "size": remote.size}
    tensors = safetensors_files(dest)
    return {"repo_id": repo_id, "revision": revision, "commit": commit, "files": record,
            "parameters": sum(v["parameters"] for v in tensors.values())}


def fetch_i3d(cfg: dict, dest: Path) -> dict:
    """StyleGAN-V's I3D TorchScript; refuse a SHA-256 mismatch; check that it loads."""
    import torch

    from osv.hub import fetch_url, link_or_copy

    path, digest = fetch_url(cfg["url"], "i3d_torchscript.pt", cfg["sha256"])
    try:
        torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # e.g. an HTML page instead of the model
        raise ValueError(f"weights.i3d.url {cfg['url']}: {path} is not a TorchScript model ({exc})") from exc
    link_or_copy(path, dest / "i3d_torchscript.pt")
    return {"url": cfg["url"], "sha256": digest, "sha256_checked": cfg["sha256"] is not None}


def fetch_inception(cfg: dict, dest: Path) -> dict:
    """pytorch-fid's FID Inception v3 state dict; refuse a SHA-256 mismatch; check that it is a state dict.

    weights.inception.sha256 null: the hex digits at the end of the URL's file name, if any,
    must start its SHA-256 (torch hub's check_hash convention), else the hash is only recorded.
    """
    import torch

    from osv.hub import fetch_url, link_or_copy

    name = cfg["url"].split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    prefix = None
    if cfg["sha256"] is None and (m := HASH_SUFFIX.search(name)):
        prefix = m.group(1)
    path, digest = fetch_url(cfg["url"], Path(INCEPTION_FILE).name, cfg["sha256"], prefix)
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # e.g. an HTML page instead of the weights
        raise ValueError(f"weights.inception.url {cfg['url']}: {path} is not a torch state dict ({exc})") from exc
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights.inception.url {cfg['url']}: {path} is not a state dict of tensors")
    link_or_copy(path, dest / Path(INCEPTION_FILE).name)
    return {"url": cfg["url"], "file": INCEPTION_FILE, "sha256": digest, "sha256_checked": cfg["sha256"] is not None,
            "sha256_prefix_checked": prefix}


def from_hub(w: dict, tmp: Path) -> dict:
    # the two small URL files first: a wrong pin fails before the 9 GB of SVD
    i3d = fetch_i3d(w["i3d"], tmp / "i3d")
    inception = fetch_inception(w["inception"], tmp / Path(INCEPTION_FILE).parent)
    parts = {"teacher": fetch_repo(w["teacher"], TEACHER_FILES, tmp),
             "dinov2": fetch_repo(w["dinov2"], DINOV2_FILES, tmp / "dinov2"),
             "i3d": i3d, "inception": inception}
    return {"source": "hub", "parts": parts,
            "note": "Pretrained weights at pinned commits; SVD fp32 diffusers files; every file SHA-256 checked "
                    "against the hub (I3D against weights.i3d.sha256 when set, the FID Inception weights against "
                    "weights.inception.sha256, else against the hash prefix in their file name)."}
