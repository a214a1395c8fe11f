"""`osv fvd`: FVD and per-frame FID of one method's samples against the real test clips.

Real clips: the first eval.num_clips test clips of data/clips/manifest.csv, loaded
with osv.video.load_clip at data.frames / data.fps / data.resolution (the one
definition of a clip). Generated: samples/M/*.mp4 in name order. Video features
come from eval.fvd_backbone, frame features (all frames of all clips) from
eval.fid_backbone (see osv.eval.features). Frame-0 PSNR: does each sample reproduce its
conditioning frame (osv.eval.psnr)? The metric JSON holds the numbers, its
provenance file beside it the whole protocol, so numbers are only ever compared with
numbers made the same way.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from osv.eval.intervals import MIN_CLIPS_FOR_INTERVALS
from osv.params import ParamsError, load_params
from osv.provenance import weights_description

# Below about this many clips the 400-d I3D covariance is singular (environment.md).
MIN_CLIPS_FOR_STABLE_COVARIANCE = 400


def register(subparsers) -> None:
    p = subparsers.add_parser("fvd", help="FVD / FID of one method's samples with the full protocol")
    p.add_argument("--params", default="params.yaml", help="params file")
    p.add_argument("--method", required=True, help="a key of eval.methods")
    p.add_argument("--samples", required=True, help="samples/M: clip-*.mp4 and meta.json")
    p.add_argument("--clips", required=True, help="data/clips (manifest.csv and the test mp4s)")
    p.add_argument("--base", required=True, help="models/base (i3d/i3d_torchscript.pt at paper scale)")
    p.add_argument("--out", required=True, help="metrics/eval/M.json")
    p.add_argument("--cache-dir", default="features", help="feature cache folder ('' disables it)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    if args.method not in params["eval"]["methods"]:
        raise ParamsError(f"{args.params}: --method {args.method} is not in eval.methods "
                          f"({sorted(params['eval']['methods'])})")
    from osv.launch import run_stage

    kwargs = dict(params=params, method=args.method, samples=args.samples, clips=args.clips, base=args.base,
                  out=args.out, cache_dir=args.cache_dir or None, device=args.device)
    result = run_stage("fvd", evaluate_method, kwargs, params)
    print(json.dumps({k: result.get(k) for k in ("fvd", "fid", "kvd", "frame0_psnr", "nfe", "sec_per_video")}))
    return 0


def real_clip_paths(clips: str | Path, num_clips: int) -> list[Path]:
    """The first num_clips test clips of the manifest, in manifest order."""
    from osv.data import read_manifest

    clips = Path(clips)
    rows = read_manifest(clips / "manifest.csv", split="test")
    if not rows:
        raise FileNotFoundError(f"{clips / 'manifest.csv'}: no clips with split == test")
    return [clips / row["video"] for row in rows[:num_clips]]


def sample_paths(samples: str | Path) -> list[Path]:
    paths = sorted(Path(samples).glob("*.mp4"))
    if not paths:
        raise FileNotFoundError(f"{samples}: no generated *.mp4 clips")
    return paths


def read_meta(samples: str | Path) -> dict:
    path = Path(samples) / "meta.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: sample metadata not found (written by `osv generate`)")
    meta = json.loads(path.read_text())
    if "nfe" not in meta:
        raise KeyError(f"{path}: missing key 'nfe'")
    if "sec_per_video" not in meta:
        raise KeyError(f"{path}: missing key 'sec_per_video'")
    return meta


def _checked(frames: np.ndarray, path: Path, shape: tuple[int, int, int]) -> np.ndarray:
    if frames.shape[1:] != shape[1:] or frames.shape[0] < shape[0]:
        raise ValueError(f"{path}: clip is {list(frames.shape)}, the protocol needs at least "
                         f"{shape[0]} frames of {shape[2]}x{shape[1]} (W x H)")
    return frames[: shape[0]]


def build_protocol(params: dict, video_ext, frame_ext, n_real: int, n_gen: int, meta: dict) -> dict:
    data = params["data"]
    res = data["resolution"]
    protocol = {
        "fvd_backbone": video_ext.name,
        "fid_backbone": frame_ext.name,
        "clips_real": n_real,
        "clips_generated": n_gen,
        "frames": data["frames"],
        "resolution": [res["width"], res["height"]],
        "resize": video_ext.resize,
        "fps": data["fps"],
        "seeds": meta.get("seeds", meta.get("seed", params["eval"]["seed"])),
        "scale": params["scale"],
        "weights": weights_description(params),
    }
    protocol.update(checkpoint_hashes(meta))
    return protocol


def checkpoint_hashes(meta: dict) -> dict:
    """teacher_sha256 / student_sha256 from meta.json (osv generate names them *_unet_sha256 / unet_sha256)."""
    out = {}
    teacher = meta.get("teacher_sha256", meta.get("teacher_unet_sha256"))
    is_student = meta.get("sampler") not in (None, "teacher")  # the teacher's unet is not a student
    student = meta.get("student_sha256", meta.get("unet_sha256") if is_student else None)
    if teacher:
        out["teacher_sha256"] = teacher
    if student:
        out["student_sha256"] = student
    return out


def evaluate_method(params: dict, method: str, samples: str, clips: str, base: str, out: str,
                    cache_dir: str | None = "features", device: str | None = None) -> dict:
    """Compute FVD and FID for one method and write the metric JSON atomically; return it."""
    import torch

    from osv.eval.features import clip_features, frame_extractor, video_extractor
    from osv.eval.frechet import frechet_from_features
    from osv.eval.intervals import kernel_distance
    from osv.numerics import injected
    from osv.provenance import record, require_finite_metrics, write_metrics
    from osv.video import load_clip, read_frames

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    data, ev = params["data"], params["eval"]
    w, h, t = data["resolution"]["width"], data["resolution"]["height"], data["frames"]
    shape = (t, h, w, 3)
    meta = read_meta(samples)
    real_paths, gen_paths = real_clip_paths(clips, ev["num_clips"]), sample_paths(samples)
    video_ext, frame_ext = video_extractor(params, base, device), frame_extractor(params, device, base)
    extractors = {"video": video_ext, "frame": frame_ext}
    load_real = lambda p: _checked(load_clip(p, t, data["fps"], w, h), p, shape)  # noqa: E731
    load_gen = lambda p: _checked(read_frames(p)[0], p, shape)  # noqa: E731
    feat_protocol = {"frames": t, "fps": data["fps"], "resolution": [w, h]}
    real = clip_features(real_paths, load_real, extractors, ev["batch_size"], {**feat_protocol, "side": "real"},
                         cache_dir, desc="real clips")
    gen = clip_features(gen_paths, load_gen, extractors, ev["batch_size"], {**feat_protocol, "side": "generated"},
                        cache_dir, desc=f"{method} clips")
    result = {
        "method": method,
        "fvd": frechet_from_features(real["video"], gen["video"]) * injected("fvd", 0),
        "fid": frechet_from_features(real["frame"], gen["frame"]),
        "kvd": kernel_distance(real["video"], gen["video"]),
        "nfe": meta["nfe"],
        "sec_per_video": meta["sec_per_video"],
        "protocol": build_protocol(params, video_ext, frame_ext, len(real_paths), len(gen_paths), meta),
        "warnings": protocol_warnings(len(real_paths), len(gen_paths), video_ext.dim),
    }
    result.update(intervals(ev["bootstrap"], real["video"], gen["video"], real_paths, meta))
    result["protocol"]["bootstrap"] = {**ev["bootstrap"], "unit": "test clip, paired across methods"}
    add_frame0_psnr(result, frame0_psnr(ev["bootstrap"], clips, real_paths, gen_paths, meta, shape, data["fps"]))
    require_finite_metrics("fvd", result, out)  # before the DINOv2 pass: a NaN FVD is not worth it
    result["dinov2_mse"] = dinov2_mse(params, base, clips, gen_paths, meta, load_real, load_gen, device)
    write_metrics(out, result, record(params, "fvd", method, precision="fp32", device=torch.device(device).type))
    return result


def intervals(boot: dict, real: np.ndarray, gen: np.ndarray, real_paths: list[Path], meta: dict) -> dict:
    """Bootstrap intervals of FVD and KVD over test clips (osv.eval.intervals), and the replicates,
    which the report pairs across methods. Sample i must start from test clip i (meta.json clip_ids)."""
    from osv.eval.intervals import bootstrap, interval

    if not boot["resamples"]:
        return {}
    if len(real) < MIN_CLIPS_FOR_INTERVALS:
        return {"interval_warning": f"no bootstrap intervals: {len(real)} clips (< {MIN_CLIPS_FOR_INTERVALS})"}
    ids = meta.get("clip_ids")
    real_ids = [f"{p.parent.name}/{p.stem}" for p in real_paths]
    if len(gen) != len(real) or (ids is not None and list(ids) != real_ids):
        raise ValueError(f"paired bootstrap: the {len(gen)} samples do not start from the {len(real)} real test "
                         f"clips in manifest order (meta.json clip_ids {ids[:3] if ids else None}...)")
    reps = bootstrap(real, gen, boot["resamples"], boot["seed"])
    ci = {f"{k}_ci": dict(zip(("low", "high"), interval(v, boot["level"]))) for k, v in reps.items()}
    return {**ci, "replicates": reps}  # lists: kept in the provenance file, read back by the report


def frame0_psnr(boot: dict, clips: str | Path, real_paths: list[Path], gen_paths: list[Path], meta: dict,
                shape: tuple[int, int, int, int], fps: float) -> dict:
    """Does each sample reproduce its conditioning frame? PSNR (osv.eval.psnr) of generated frame 0
    against its test clip's frame 0, both uint8 RGB at the protocol's resolution (the test clip through
    load_clip, as for the features), per clip; their mean, and its bootstrap interval over clips with
    the resamples of FVD's (sample i starts from test clip i: meta.json clip_ids, else manifest order)."""
    from osv.eval.intervals import bootstrap_mean, interval
    from osv.eval.psnr import first_frame, psnr
    from osv.video import load_clip

    _, h, w, _ = shape
    ids = meta.get("clip_ids")
    if ids is not None and len(ids) == len(gen_paths):
        reals = [Path(clips) / f"{clip_id}.mp4" for clip_id in ids]
    elif ids is None and len(real_paths) == len(gen_paths):
        reals = real_paths
    else:
        return {"frame0_psnr_warning": f"no frame-0 PSNR: {len(gen_paths)} samples, "
                                       f"{len(ids) if ids is not None else len(real_paths)} test clips to pair them with"}
    values = []
    for real_path, gen_path in zip(reals, gen_paths):
        gen = first_frame(gen_path)
        if gen.shape != (h, w, 3):
            raise ValueError(f"{gen_path}: frame 0 is {list(gen.shape)}, the protocol needs {w}x{h} (W x H)")
        values.append(psnr(gen, load_clip(real_path, 1, fps, w, h)[0]))
    out = {"frame0_psnr": float(np.mean(values)), "frame0_psnr_per_clip": values}
    if boot["resamples"] and len(values) >= MIN_CLIPS_FOR_INTERVALS:
        reps = bootstrap_mean(values, boot["resamples"], boot["seed"])
        out["frame0_psnr_ci"] = dict(zip(("low", "high"), interval(reps, boot["level"])))
        out["replicates"] = {"frame0_psnr": reps}
    return out


def add_frame0_psnr(result: dict, frame0: dict) -> None:
    """Merge frame0_psnr's keys into the metric dict (its replicates beside FVD's and KVD's)."""
    reps = frame0.pop("replicates", None)
    result.update(frame0)
    if reps:
        result.setdefault("replicates", {}).update(reps)


def protocol_warnings(n_real: int, n_gen: int, dim: int) -> list[str]:
    n = min(n_real, n_gen)
    if n >= MIN_CLIPS_FOR_STABLE_COVARIANCE:
        return []
    return [f"only {n_real} real / {n_gen} generated clips (< {MIN_CLIPS_FOR_STABLE_COVARIANCE}): the "
            f"{dim}-d feature covariance is {'singular' if n <= dim else 'poorly conditioned'}, so this FVD "
            f"is only comparable with numbers made under exactly this protocol"]


def _dinov2_features(model, frames: np.ndarray, size: int, device: str):
    """Pooled (CLS, layer-normed) DINOv2 features of uint8 frames [N, H, W, 3], ImageNet-normalised."""
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(frames).permute(0, 3, 1, 2).float().div(255).to(device)
    x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)
    return model(pixel_values=(x - mean) / std).pooler_output.double()


def dinov2_mse(params: dict, base: str | Path, clips: str | Path, gen_paths: list[Path], meta: dict,
               load_real, load_gen, device: str) -> dict | None:
    """Table 3 [reconstructed reading]: MSE of DINOv2 features of every generated frame against
    the conditioning image (the test clip's first frame) repeated, and against the test clip's
    frame at the same time ("target"). Needs meta.json `clip_ids` (the test clip id of each
    sample, in sample name order) and base/dinov2; returns None (with the reason printed) otherwise.
    """
    import torch

    from osv.models import load_dinov2

    ids, folder = meta.get("clip_ids"), Path(base) / "dinov2"
    if not ids or len(ids) != len(gen_paths) or not folder.is_dir():
        print(f"[osv fvd] DINOv2-feature MSE skipped: needs meta.json clip_ids for all {len(gen_paths)} "
              f"samples and {folder}")
        return None
    model = load_dinov2(folder).eval().to(device)
    size = params["disc"]["backbone_input"]
    sums = {"vs_input": 0.0, "vs_target": 0.0}
    count = 0
    with torch.no_grad():
        for clip_id, gen_path in zip(ids, gen_paths):
            real = _dinov2_features(model, load_real(Path(clips) / f"{clip_id}.mp4"), size, device)
            gen = _dinov2_features(model, load_gen(gen_path), size, device)
            sums["vs_input"] += (gen - real[:1]).pow(2).mean().item() * len(gen)
            sums["vs_target"] += (gen - real).pow(2).mean().item() * len(gen)
            count += len(gen)
    return {k: v / count for k, v in sums.items()} | {
        "backbone": f"DINOv2 ({folder}) pooled CLS at {size}x{size}", "frames": count}
