"""Previews of a folder of generated mp4s: an animated GIF grid and a PNG contact sheet.

`make_previews(folder)` writes folder/preview.gif (the first <= 8 clips tiled in a
grid, one GIF frame per video frame) and folder/contact.png (one row per clip:
its first, middle and last frame). `osv generate` calls it after writing samples.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from osv.atomic import atomic_path

MAX_CLIPS = 8
GRID_COLUMNS = 4
PAD = 2  # pixels of white between tiles


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


def write_gif(path: str | Path, clips: list[np.ndarray], fps: float, columns: int = GRID_COLUMNS) -> None:
    """Animated grid GIF of clips (uint8 [T, H, W, 3] each), looping, atomically."""
    length = max(len(c) for c in clips)
    frames = [Image.fromarray(_grid([c[min(t, len(c) - 1)] for c in clips], columns)) for t in range(length)]
    with atomic_path(path, suffix=".gif") as tmp:
        frames[0].save(tmp, save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0)


def write_contact_sheet(path: str | Path, clips: list[np.ndarray]) -> None:
    """PNG with one row per clip: first, middle and last frame."""
    tiles = [c[i] for c in clips for i in (0, len(c) // 2, len(c) - 1)]
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(_grid(tiles, 3)).save(tmp)


def make_previews(folder: str | Path, max_clips: int = MAX_CLIPS) -> tuple[Path, Path]:
    """Write folder/preview.gif and folder/contact.png from the first max_clips *.mp4 (name order)."""
    folder = Path(folder)
    paths = sorted(folder.glob("*.mp4"))[:max_clips]
    if not paths:
        raise FileNotFoundError(f"{folder}: no *.mp4 clips to preview")
    clips, fps = _load(paths)
    gif, png = folder / "preview.gif", folder / "contact.png"
    write_gif(gif, clips, fps)
    write_contact_sheet(png, clips)
    return gif, png
