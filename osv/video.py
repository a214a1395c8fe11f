"""Video I/O with PyAV: decode, encode (H.264 mp4), and the one clip loader.

`load_clip` is the single definition of "a clip at T frames, fps, W x H": the
data stage, the encode stage and FVD's real clips all go through it, so real and
generated videos are resampled and cropped the same way.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

from osv.atomic import atomic_path

# Frame times are compared with this slack (seconds) so float rounding of
# k / fps never drops a frame that lies exactly on a boundary.
TIME_EPS = 1e-6


class VideoError(RuntimeError):
    """A video that cannot be decoded, encoded or is too short for the request."""


def _open(path: str | Path):
    import av

    try:
        return av.open(str(path))
    except (av.FFmpegError, OSError) as exc:
        raise VideoError(f"{path}: cannot open video: {exc}") from exc


def _stream_fps(stream, path) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate:
        raise VideoError(f"{path}: video stream has no frame rate")
    return float(rate)


def _frame_time(frame, index: int, fps: float) -> float:
    # Files without timestamps fall back to the nominal rate.
    return float(frame.time) if frame.time is not None else index / fps


def iter_frames(path: str | Path, until: float | None = None):
    """Yield (time_sec, av.VideoFrame, stream_fps) in decode order; stop after `until`."""
    import av

    with _open(path) as container:
        if not container.streams.video:
            raise VideoError(f"{path}: no video stream")
        stream = container.streams.video[0]
        fps = _stream_fps(stream, path)
        start = float(stream.start_time * stream.time_base) if stream.start_time else 0.0
        try:
            for i, frame in enumerate(container.decode(stream)):
                t = _frame_time(frame, i, fps) - start
                yield t, frame, fps
                if until is not None and t > until + TIME_EPS:
                    return
        except av.FFmpegError as exc:
            raise VideoError(f"{path}: decoding failed: {exc}") from exc


def decode(path: str | Path, until: float | None = None, convert=None) -> tuple[np.ndarray, list, float]:
    """(frame times, frames, stream fps); `convert` maps each av.VideoFrame (default: kept as is)."""
    times, frames, fps = [], [], None
    for t, frame, fps in iter_frames(path, until):  # noqa: B007 (fps is read after the loop)
        times.append(t)
        frames.append(convert(frame) if convert else frame)
    if not frames:
        raise VideoError(f"{path}: no frames decoded")
    return np.array(times), frames, fps


# BT.601 limited range, swscale's default when a file does not say otherwise.
_RGB2YUV = np.array([[0.256788, 0.504129, 0.097906], [-0.148223, -0.290993, 0.439216],
                     [0.439216, -0.367788, -0.071427]])
_YUV_OFFSET = np.array([16.0, 128.0, 128.0])
_YUV2RGB = np.linalg.inv(_RGB2YUV)


def rgb_to_yuv420p(rgb: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> yuv420p planes stacked as [H * 3 / 2, W] (chroma: mean of 2x2 blocks).

    Done in numpy rather than swscale, whose output was seen to vary between calls
    in one process (SIMD paths depend on buffer alignment): same frames, same bytes.
    """
    h, w, _ = rgb.shape
    yuv = rgb.astype(np.float64) @ _RGB2YUV.T + _YUV_OFFSET
    chroma = yuv[..., 1:].reshape(h // 2, 2, w // 2, 2, 2).mean(axis=(1, 3))
    planes = [yuv[..., 0], chroma[..., 0].reshape(h // 4, w), chroma[..., 1].reshape(h // 4, w)]
    return np.clip(np.rint(np.concatenate(planes)), 0, 255).astype(np.uint8)


def yuv420p_to_rgb(planes: np.ndarray) -> np.ndarray:
    """Inverse of rgb_to_yuv420p (chroma shared by each 2x2 block); float32, elementwise."""
    h, w = planes.shape[0] * 2 // 3, planes.shape[1]
    m = _YUV2RGB.astype(np.float32)
    y = planes[:h].astype(np.float32) - 16.0
    u = planes[h:h + h // 4].reshape(h // 2, w // 2).astype(np.float32) - 128.0
    v = planes[h + h // 4:].reshape(h // 2, w // 2).astype(np.float32) - 128.0
    out = np.empty((h, w, 3), np.uint8)
    for c in range(3):
        chroma = (m[c, 1] * u + m[c, 2] * v).repeat(2, 0).repeat(2, 1)
        out[..., c] = np.clip(np.rint(m[c, 0] * y + chroma), 0, 255)
    return out


def to_rgb(frame) -> np.ndarray:
    """uint8 [H, W, 3]; yuv420p frames of even size are converted in numpy (exactly repeatable)."""
    if frame.format.name == "yuv420p" and frame.width % 2 == 0 and frame.height % 2 == 0:
        return yuv420p_to_rgb(frame.to_ndarray())
    return frame.to_ndarray(format="rgb24")


def read_frames(path: str | Path) -> tuple[np.ndarray, float]:
    """All frames of a video as uint8 [N, H, W, 3] and its frame rate."""
    _, frames, fps = decode(path, convert=to_rgb)
    return np.stack(frames), fps


def cover_indices(times: np.ndarray, targets: np.ndarray, frame_dur: float, path="video") -> np.ndarray:
    """Index of the source frame shown at each target time (time_j <= t < time_{j+1}).

    The last frame is shown for `frame_dur` seconds. Raises if a target lies
    outside the video.
    """
    times = np.asarray(times, dtype=np.float64)
    idx = np.searchsorted(times, np.asarray(targets) + TIME_EPS, side="right") - 1
    end = times[-1] + frame_dur
    bad = (idx < 0) | (np.asarray(targets) >= end - TIME_EPS)
    if bad.any():
        raise VideoError(
            f"{path}: video covers [{times[0]:.3f}, {end:.3f}) s but frames at "
            f"{np.asarray(targets)[bad].round(3).tolist()} s were requested")
    return idx


def clip_times(start_sec: float, frames: int, fps: float) -> np.ndarray:
    """Times of T frames at `fps` starting at `start_sec`."""
    return start_sec + np.arange(frames, dtype=np.float64) / fps


def resize_crop(frame: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize so the frame covers width x height (shorter side fits), then centre-crop.

    PIL's bicubic resize filters when downscaling (antialiasing).
    """
    h, w = frame.shape[:2]
    scale = max(width / w, height / h)
    rw, rh = max(width, round(w * scale)), max(height, round(h * scale))
    img = Image.fromarray(frame)
    if (rw, rh) != (w, h):
        img = img.resize((rw, rh), Image.Resampling.BICUBIC)
    left, top = (rw - width) // 2, (rh - height) // 2
    return np.asarray(img.crop((left, top, left + width, top + height)))


def load_clip(path: str | Path, frames: int, fps: float, width: int, height: int,
              start_sec: float = 0.0) -> np.ndarray:
    """T frames at `fps` from `start_sec` (resampled by time), resized and centre-cropped.

    Returns uint8 [T, height, width, 3].
    """
    return load_clip_sizes(path, frames, fps, [(width, height)], start_sec)[0]


def load_clip_sizes(path: str | Path, frames: int, fps: float, sizes: list[tuple[int, int]],
                    start_sec: float = 0.0) -> list[np.ndarray]:
    """load_clip at several (width, height) sizes from one decode (decoding is most of the cost
    of a full-HD clip); each array equals load_clip's at that size."""
    targets = clip_times(start_sec, frames, fps)
    times, decoded, src_fps = decode(path, until=float(targets[-1]))
    idx = cover_indices(times, targets, 1.0 / src_fps, path).tolist()
    rgb = {i: to_rgb(decoded[i]) for i in dict.fromkeys(idx)}
    out = []
    for width, height in sizes:
        resized = {i: resize_crop(frame, width, height) for i, frame in rgb.items()}
        out.append(np.stack([resized[i] for i in idx]))
    return out


def write_mp4(path: str | Path, frames: np.ndarray, fps: float, crf: int = 0) -> None:
    """Write uint8 [T, H, W, 3] as H.264 (yuv420p) mp4, atomically.

    crf 0 is lossless in 8-bit x264: decoding returns exactly the yuv420p planes
    we computed, so the same frames always decode the same (x264's bytes were seen
    to vary within one process, its frames do not).
    """
    import av

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise VideoError(f"{path}: expected uint8 [T, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise VideoError(f"{path}: yuv420p needs even width and height, got {w}x{h}")
    rate = Fraction(fps).limit_denominator(1001)
    with atomic_path(path, suffix=".mp4") as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=rate)
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            stream.codec_context.thread_count = 1
            stream.options = {"crf": str(crf), "preset": "medium", "threads": "1"}
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(rgb_to_yuv420p(frame), format="yuv420p")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)


def tensor_to_uint8(frames) -> np.ndarray:
    """Decoded frames, a torch tensor [T, 3, H, W] in [-1, 1] -> uint8 [T, H, W, 3] for write_mp4."""
    return ((frames.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
