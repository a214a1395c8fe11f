"""Previews of generated clips: per method, and beside the real test clips they started from.

`make_previews(folder)` writes folder/preview.gif (the first <= 8 clips tiled in a grid, one
GIF frame per video frame) and folder/contact.png (one row per clip: its first, middle and last
frame, under a label with the clip's test clip id). `osv generate` calls it after writing samples.

`compare_with_real(samples, clips, out_dir)` writes out_dir/M.png and out_dir/M.gif: for the first
<= 4 samples of method M, the sample (left half) beside the real test clip it was generated from
(right half), the same frames, the clip id above each row and the method above the sheet. `osv
report` calls it (it reads data/clips; `osv generate` does not).
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from osv.atomic import atomic_path

MAX_CLIPS = 8
GRID_COLUMNS = 4
PAD = 2  # pixels of white between tiles
GAP = 8  # pixels of white between the sample half and the real half of a comparison row
LABEL_H = 16  # height of a label strip, pixels
FONT_SIZE = 11
MAX_PAIRS = 4  # clips per comparison sheet: a sheet is for looking at, not for scoring
MAX_SIDE = 256  # longest side of a comparison tile; paper-scale frames are shrunk to it


def _grid(tiles: list[np.ndarray], columns: int) -> np.ndarray:
    """Tile equally sized uint8 [H, W, 3] images row-major with PAD-pixel white gaps."""
    h, w = tiles[0].shape[:2]
    rows = math.ceil(len(tiles) / columns)
    cols = min(columns, len(tiles))
    canvas = np.full((rows * (h + PAD) + PAD, cols * (w + PAD) + PAD, 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        canvas[PAD + r * (h + PAD): PAD + r * (h + PAD) + h, PAD + c * (w + PAD): PAD + c * (w + PAD) + w] = tile
    return canvas


@functools.cache
def _font():
    return ImageFont.load_default(FONT_SIZE)


def label_strip(width: int, texts: dict[int, str]) -> np.ndarray:
    """A white LABEL_H-pixel strip, each text drawn in black from its x offset (PIL's default font),
    cut at the next text's offset so that a long label never runs into the next."""
    strip = Image.new("RGB", (width, LABEL_H), "white")
    edges = sorted(texts) + [width]
    for x, end in zip(edges, edges[1:]):
        box = Image.new("RGB", (max(1, end - x), LABEL_H), "white")
        ImageDraw.Draw(box).text((PAD, 2), texts[x], fill="black", font=_font())
        strip.paste(box, (x, 0))
    return np.asarray(strip)


def _load(paths: list[Path]) -> tuple[list[np.ndarray], float]:
    from osv.video import read_frames

    clips, fps = [], None
    for path in paths:
        frames, clip_fps = read_frames(path)
        clips.append(frames)
        fps = fps or clip_fps
    shapes = {c.shape[1:] for c in clips}
    if len(shapes) != 1:
        raise ValueError(f"{paths[0].parent}: clips differ in frame size {sorted(shapes)}; cannot tile them")
    return clips, float(fps)


def _save_gif(path: str | Path, frames: list[np.ndarray], fps: float) -> None:
    images = [Image.fromarray(f) for f in frames]
    with atomic_path(path, suffix=".gif") as tmp:
        images[0].save(tmp, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)


def write_gif(path: str | Path, clips: list[np.ndarray], fps: float, columns: int = GRID_COLUMNS) -> None:
    """Animated grid GIF of clips (uint8 [T, H, W, 3] each), looping, atomically."""
    length = max(len(c) for c in clips)
    _save_gif(path, [_grid([c[min(t, len(c) - 1)] for c in clips], columns) for t in range(length)], fps)


def key_frames(length: int) -> list[int]:
    """The frames a sheet shows of a clip: first, middle, last."""
    return [0, length // 2, length - 1]


def write_contact_sheet(path: str | Path, clips: list[np.ndarray], labels: list[str], title: str = "") -> None:
    """PNG with one row per clip (first, middle and last frame) under a strip with its label."""
    rows = [_grid([c[i] for i in key_frames(len(c))], 3) for c in clips]
    width = rows[0].shape[1]
    parts = [label_strip(width, {0: title})] if title else []
    parts += [p for row, label in zip(rows, labels) for p in (label_strip(width, {0: label}), row)]
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(np.concatenate(parts)).save(tmp)


def read_meta(folder: Path) -> dict:
    path = folder / "meta.json"
    return json.loads(path.read_text()) if path.exists() else {}


def make_previews(folder: str | Path, max_clips: int = MAX_CLIPS) -> tuple[Path, Path]:
    """Write folder/preview.gif and folder/contact.png from the first max_clips *.mp4 (name order);
    contact.png labels each row with meta.json's clip id (else the file name)."""
    folder = Path(folder)
    paths = sorted(folder.glob("*.mp4"))[:max_clips]
    if not paths:
        raise FileNotFoundError(f"{folder}: no *.mp4 clips to preview")
    clips, fps = _load(paths)
    meta = read_meta(folder)
    ids = meta.get("clip_ids") or []
    labels = [f"{p.stem}: {ids[i]}" if i < len(ids) else p.stem for i, p in enumerate(paths)]
    gif, png = folder / "preview.gif", folder / "contact.png"
    write_gif(gif, clips, fps)
    title = f"{meta['method']}: frames {', '.join(map(str, key_frames(len(clips[0]))))}" if "method" in meta else ""
    write_contact_sheet(png, clips, labels, title)
    return gif, png


# ---------------------------------------------------------------- samples beside the real clips

def _shrink(clip: np.ndarray, max_side: int = MAX_SIDE) -> np.ndarray:
    """The clip scaled so its longest side is at most max_side (a sheet of 4 x 6 paper-scale frames
    would be ~6000 pixels wide)."""
    t, h, w, _ = clip.shape
    scale = max_side / max(h, w)
    if scale >= 1:
        return clip
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.stack([np.asarray(Image.fromarray(f).resize(size, Image.Resampling.BICUBIC)) for f in clip])


def _pair_row(sample: list[np.ndarray], real: list[np.ndarray]) -> tuple[np.ndarray, int]:
    """Sample tiles | GAP | real tiles, and the x where the real half starts."""
    left, right = _grid(sample, len(sample)), _grid(real, len(real))
    gap = np.full((left.shape[0], GAP, 3), 255, np.uint8)
    return np.concatenate([left, gap, right], axis=1), left.shape[1] + GAP


def comparison_image(samples: list[np.ndarray], reals: list[np.ndarray], ids: list[str], method: str,
                     frames: list[int] | None = None, t: int = 0) -> np.ndarray:
    """One sheet: a header (method | real), then per clip its id and a row sample | real. `frames`:
    the frame indices to show of each clip (a still sheet), else the single frame t (a GIF frame)."""
    rows = []
    for sample, real in zip(samples, reals):
        pick = frames or [min(t, len(sample) - 1)]
        rows.append(_pair_row([sample[i] for i in pick], [real[i] for i in pick]))
    width, x_real = rows[0][0].shape[1], rows[0][1]
    shown = f": frames {', '.join(map(str, frames))}" if frames else ""
    parts = [label_strip(width, {0: f"{method}{shown}", x_real: "real test clip"})]
    for (row, _), cid in zip(rows, ids):
        parts += [label_strip(width, {0: cid}), row]
    return np.concatenate(parts)


def write_comparison(png: Path, gif: Path, samples: list[np.ndarray], reals: list[np.ndarray], ids: list[str],
                     method: str, fps: float) -> None:
    """png: first, middle and last frame of each pair; gif: the pairs playing side by side."""
    samples, reals = [_shrink(c) for c in samples], [_shrink(c) for c in reals]
    with atomic_path(png, suffix=".png") as tmp:
        Image.fromarray(comparison_image(samples, reals, ids, method, key_frames(len(samples[0])))).save(tmp)
    length = max(len(c) for c in samples)
    _save_gif(gif, [comparison_image(samples, reals, ids, method, t=t) for t in range(length)], fps)


def compare_with_real(samples: str | Path, clips: str | Path, out_dir: str | Path, method: str | None = None,
                      max_clips: int = MAX_PAIRS, cache: dict | None = None) -> tuple[Path, Path] | str:
    """out_dir/M.png and out_dir/M.gif for the method whose samples are in `samples`, or why not.

    Sample i (clip-XXXX.mp4, name order) started from test clip meta.json clip_ids[i]; that clip is
    cut as the model saw it: osv.video.load_clip from its start (the data stage cut the clip files;
    the manifest's start_sec is the position in the source video), at the sample's frame count,
    size and meta.json fps, the way osv encode and osv fvd load it. `cache`: decoded real clips,
    shared across methods (they start from the same test clips)."""
    from osv.video import load_clip, read_frames

    samples, clips, out_dir = Path(samples), Path(clips), Path(out_dir)
    method = method or samples.name
    meta = read_meta(samples)
    ids = meta.get("clip_ids")
    paths = sorted(samples.glob("clip-*.mp4"))[:max_clips]
    if not paths or not ids or len(ids) < len(paths):
        return "no samples with meta.json clip_ids"
    cache = {} if cache is None else cache
    gen, reals = [], []
    for path, cid in zip(paths, ids):
        frames, file_fps = read_frames(path)
        fps = meta.get("fps", file_fps)  # data.fps as generate wrote it, not the mp4's rounded rate
        real_path = clips / f"{cid}.mp4"
        if not real_path.exists():
            return f"{real_path} not found"
        key = (cid, *frames.shape, fps)
        if key not in cache:
            t, h, w, _ = frames.shape
            cache[key] = load_clip(real_path, t, fps, w, h)
        gen.append(frames)
        reals.append(cache[key])
    png, gif = out_dir / f"{method}.png", out_dir / f"{method}.gif"
    write_comparison(png, gif, gen, reals, list(ids[:len(paths)]), method, float(fps))
    return png, gif
