"""Feature extractors for FVD (video) and FID (frames), and their on-disk cache.

Video backbones (`eval.fvd_backbone`):
- `i3d`: StyleGAN-V's `i3d_torchscript.pt` (Kinetics-400 I3D, the FVD reference),
  loaded with torch.jit.load after its SHA-256 is checked against
  `weights.i3d.sha256`. Called as StyleGAN-V's compute_fvd calls it: clips
  [B,C,T,H,W] (uint8 values 0..255, here as float), `rescale=True, resize=True,
  return_features=True` -> 400-d features (resizing to 224x224 happens inside).
- `standin` ("stand-in: rand3d-motion-v1, seed 0"): an offline, deterministic
  extractor for the embedded scale; NOT comparable with I3D FVD. Every frame is
  resized (bilinear, antialiased) to 64x64 and scaled to [-1, 1]. Features:
  1. appearance: a frozen random Conv3d net with spatial-only kernels (1x5x5 ->
     ReLU -> 1x3x3 -> ReLU, stride 2 in space) on the frames; mean and std
     pooled over time and space (2 x 64);
  2. motion: the same structure with temporal kernels (3x5x5 -> 3x3x3) on the
     frame differences x[t+1]-x[t]; mean and std pooled (2 x 64);
  3. explicit statistics: mean |frame difference| per RGB channel at scales 1,
     1/2, 1/4 (9), mean |spatial gradient| (vertical + horizontal) per channel
     at scales 1, 1/2 (6), and the lag-1, lag-2 temporal autocorrelation per
     channel of the mean-removed clip (6); times 10 so they weigh like the rest.
  Weights are He-normal draws from torch.Generator seeded with 0 (not the global
  RNG), so the extractor is the same in every process; half of the first-layer
  filters are made zero-mean in space (edge detectors). 277-d. Shuffling frames
  changes 2 and 3, blur and noise change 1-3.

Frame backbones (`eval.fid_backbone`), applied to all frames of all clips:
- `inception`: pytorch-fid's InceptionV3 pool3 (2048-d; the FID Inception of
  TTUR/pytorch-fid/clean-fid/torchmetrics), built from pytorch-fid's classes with
  the weights `osv weights` fetched at paper scale into
  <base>/inception/pt_inception.pth (weights.inception), after their SHA-256 is
  checked against weights.inception.sha256. Nothing is downloaded here: pytorch-fid's
  own download (to the torch hub cache) is bypassed. The hash is in the extractor's
  name, hence in every fvd provenance file and feature-cache key.
- `standin` ("stand-in: rand2d-v1, seed 0"): frames resized to 64x64, a frozen
  random Conv2d net (5x5 s2 -> 3x3 s2 -> 3x3 s2, ReLU, 32/64/128 channels, half
  the first-layer filters zero-mean; generator seed 0 + 1), mean and std pooled
  (256), plus 10 x mean |spatial gradient| per channel at scales 1, 1/2 (6): 262-d.

Cache: features/<backbone>/<sha256 of clip contents + protocol>.npz, written atomically.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F

from osv.atomic import atomic_path
from osv.hub import sha256_file

STANDIN_SEED = 0
STANDIN_SIZE = 64
STANDIN_VIDEO_NAME = "rand3d-motion-v1"
STANDIN_FRAME_NAME = "rand2d-v1"
STATS_WEIGHT = 10.0


class WeightsError(RuntimeError):
    """A feature-extractor weights file that is missing or fails its hash check."""


def _he_weight(gen: torch.Generator, shape: tuple[int, ...], zero_mean_half: bool = False) -> torch.Tensor:
    """He-normal weights; optionally the second half of the filters made zero-mean in space.

    Zero-mean (DC-free) filters respond only to edges and texture, so blur and
    noise move the features; the other half keep colour and brightness.
    """
    fan_in = math.prod(shape[1:])
    w = torch.randn(shape, generator=gen) * math.sqrt(2.0 / fan_in)
    if zero_mean_half:
        half = shape[0] // 2
        w[half:] -= w[half:].mean(dim=(-2, -1), keepdim=True)
    return w


def _to_unit(clips: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [B,T,H,W,3] -> float [B,3,T,size,size] in [-1, 1] (bilinear, antialiased)."""
    x = torch.as_tensor(np.asarray(clips))
    b, t = x.shape[:2]
    frames = x.reshape(b * t, *x.shape[2:]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    frames = F.interpolate(frames, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return frames.reshape(b, t, 3, size, size).permute(0, 2, 1, 3, 4)


def _gradient_energy(x: torch.Tensor, scales: Sequence[int] = (1, 2)) -> torch.Tensor:
    """Mean |vertical| + |horizontal| difference per channel at each scale: [B, C·len(scales)].

    Works on [B,C,H,W] and [B,C,T,H,W]; sharpness and noise statistics that blur
    and added noise move strongly.
    """
    out = []
    for scale in scales:
        xs = x.flatten(0, -3)
        xs = F.avg_pool2d(xs[:, None], scale)[:, 0] if scale > 1 else xs
        xs = xs.reshape(*x.shape[:-2], *xs.shape[-2:])
        grad = (xs[..., 1:, :] - xs[..., :-1, :]).abs().flatten(2).mean(2)
        out.append(grad + (xs[..., 1:] - xs[..., :-1]).abs().flatten(2).mean(2))
    return torch.cat(out, dim=1)


def _mean_std_pool(h: torch.Tensor) -> torch.Tensor:
    flat = h.flatten(2)
    return torch.cat([flat.mean(2), flat.std(2, unbiased=False)], dim=1)


class StandinVideoFeatures:
    """Deterministic motion-sensitive video features (see the module docstring)."""

    def __init__(self, seed: int = STANDIN_SEED, size: int = STANDIN_SIZE, device: str = "cpu"):
        gen = torch.Generator().manual_seed(seed)
        self.size, self.seed, self.device = size, seed, device
        self.app = [_he_weight(gen, (32, 3, 1, 5, 5), True).to(device), _he_weight(gen, (64, 32, 1, 3, 3)).to(device)]
        self.mot = [_he_weight(gen, (32, 3, 3, 5, 5), True).to(device), _he_weight(gen, (64, 32, 3, 3, 3)).to(device)]
        self.dim = 2 * 64 + 2 * 64 + 9 + 6 + 6
        self.name = f"stand-in: {STANDIN_VIDEO_NAME}, seed {seed}"
        self.resize = f"bilinear (antialiased) per frame to {size}x{size}"

    @staticmethod
    def _branch(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
        for w in weights:
            kt = w.shape[2]
            x = F.relu(F.conv3d(x, w, stride=(1, 2, 2), padding=(kt // 2, w.shape[3] // 2, w.shape[4] // 2)))
        return _mean_std_pool(x)

    @staticmethod
    def _temporal_stats(x: torch.Tensor) -> torch.Tensor:
        stats = []
        for scale in (1, 2, 4):
            xs = F.avg_pool3d(x, (1, scale, scale)) if scale > 1 else x
            stats.append((xs[:, :, 1:] - xs[:, :, :-1]).abs().mean(dim=(2, 3, 4)))
        stats.append(_gradient_energy(x))
        centred = x - x.mean(dim=2, keepdim=True)
        var = centred.pow(2).mean(dim=(2, 3, 4)) + 1e-8
        for lag in (1, 2):
            if lag < x.shape[2]:
                cov = (centred[:, :, lag:] * centred[:, :, :-lag]).mean(dim=(2, 3, 4))
                stats.append(cov / var)
            else:
                stats.append(torch.zeros_like(var))
        return torch.cat(stats, dim=1) * STATS_WEIGHT

    @torch.no_grad()
    def __call__(self, clips: np.ndarray) -> np.ndarray:
        if clips.shape[1] < 2:
            raise ValueError(f"the stand-in video extractor needs at least 2 frames, got {clips.shape[1]}")
        x = _to_unit(clips, self.size).to(self.device)
        diff = x[:, :, 1:] - x[:, :, :-1]
        feats = [self._branch(x, self.app), self._branch(diff, self.mot), self._temporal_stats(x)]
        return torch.cat(feats, dim=1).double().cpu().numpy()


class I3DVideoFeatures:
    """StyleGAN-V's TorchScript I3D: [B,C,T,H,W] -> 400-d features before the classifier."""

    KWARGS = dict(rescale=True, resize=True, return_features=True)

    def __init__(self, path: str | Path, expected_sha256: str | None, device: str = "cpu"):
        path = Path(path)
        if not path.exists():
            raise WeightsError(f"{path}: I3D TorchScript file not found (run `osv weights` at paper scale, "
                               f"or set eval.fvd_backbone: standin)")
        self.sha256 = sha256_file(path)
        if expected_sha256 is not None and self.sha256 != expected_sha256:
            raise WeightsError(f"{path}: SHA-256 mismatch for the I3D weights: expected {expected_sha256} "
                               f"(weights.i3d.sha256), actual {self.sha256}")
        self.model = torch.jit.load(str(path), map_location=device).eval()
        self.device = device
        self.name = f"i3d_torchscript.pt sha256:{self.sha256}"
        self.resize = "inside i3d_torchscript.pt (resize=True, to 224x224), rescale=True"
        self.dim = 400

    @torch.no_grad()
    def __call__(self, clips: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(np.asarray(clips)).permute(0, 4, 1, 2, 3).float().to(self.device)
        return self.model(x, **self.KWARGS).double().cpu().numpy()


class StandinFrameFeatures:
    """Deterministic random 2D conv features of single frames (see the module docstring)."""

    def __init__(self, seed: int = STANDIN_SEED, size: int = STANDIN_SIZE, device: str = "cpu"):
        gen = torch.Generator().manual_seed(seed + 1)
        shapes = [(32, 3, 5, 5), (64, 32, 3, 3), (128, 64, 3, 3)]
        self.weights = [_he_weight(gen, s, i == 0).to(device) for i, s in enumerate(shapes)]
        self.size, self.device, self.dim = size, device, 256 + 6
        self.name = f"stand-in: {STANDIN_FRAME_NAME}, seed {seed}"

    @torch.no_grad()
    def __call__(self, frames: np.ndarray) -> np.ndarray:
        x = _to_unit(frames[:, None], self.size)[:, :, 0].to(self.device)
        sharpness = _gradient_energy(x) * STATS_WEIGHT
        for w in self.weights:
            x = F.relu(F.conv2d(x, w, stride=2, padding=w.shape[-1] // 2))
        return torch.cat([_mean_std_pool(x), sharpness], dim=1).double().cpu().numpy()


# Where `osv weights` puts weights.inception below models/base (osv.weights.INCEPTION_FILE).
INCEPTION_FILE = "inception/pt_inception.pth"
DEFAULT_BASE = "models/base"


def inception_weights_path(base: str | Path = DEFAULT_BASE) -> Path:
    return Path(base) / INCEPTION_FILE


def load_fid_inception(path: str | Path, device: str = "cpu") -> torch.nn.Module:
    """pytorch-fid's InceptionV3 (pool3 block, its own resize and [-1, 1] scaling) with the weights in `path`.

    pytorch-fid builds the network and then calls its module-level `load_state_dict_from_url`
    (which would download to the torch hub cache); for the length of the build that call is
    answered with the state dict read from `path`, so the model class stays pytorch-fid's own.
    """
    import pytorch_fid.inception as pfi

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{path}: not a readable torch state dict ({exc})") from exc

    def from_file(url, *args, **kwargs):
        return state

    try:
        with mock.patch.object(pfi, "load_state_dict_from_url", from_file):
            model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    except (RuntimeError, TypeError, AttributeError) as exc:  # load_state_dict: missing keys, wrong shapes
        raise WeightsError(f"{path}: not pytorch-fid's FID Inception weights ({exc})") from exc
    return model.eval().to(device)


class InceptionFrameFeatures:
    """pytorch-fid's InceptionV3 pool3 features (2048-d) from weights `osv weights` fetched; never downloads."""

    def __init__(self, path: str | Path | None = None, expected_sha256: str | None = None, device: str = "cpu"):
        path = Path(path) if path is not None else inception_weights_path()
        if not path.exists():
            raise WeightsError(f"{path}: FID Inception weights not found; they are not downloaded at run time "
                               f"(run `osv weights` with weights.source: hub, which fetches weights.inception, "
                               f"or set eval.fid_backbone: standin)")
        self.sha256 = sha256_file(path)
        if expected_sha256 is not None and self.sha256 != expected_sha256:
            raise WeightsError(f"{path}: SHA-256 mismatch for the FID Inception weights: expected {expected_sha256} "
                               f"(weights.inception.sha256), actual {self.sha256}")
        self.model = load_fid_inception(path, device)
        self.device, self.dim = device, 2048
        self.name = f"pytorch-fid InceptionV3 pool3 sha256:{self.sha256}"

    @torch.no_grad()
    def __call__(self, frames: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(np.asarray(frames)).permute(0, 3, 1, 2).float().div(255).to(self.device)
        return self.model(x)[0].flatten(1).double().cpu().numpy()


def video_extractor(params: dict, base: str | Path, device: str = "cpu"):
    if params["eval"]["fvd_backbone"] == "i3d":
        return I3DVideoFeatures(Path(base) / "i3d" / "i3d_torchscript.pt", params["weights"]["i3d"]["sha256"], device)
    return StandinVideoFeatures(device=device)


def frame_extractor(params: dict, device: str = "cpu", base: str | Path = DEFAULT_BASE):
    if params["eval"]["fid_backbone"] == "inception":
        return InceptionFrameFeatures(inception_weights_path(base), params["weights"]["inception"]["sha256"], device)
    return StandinFrameFeatures(device=device)


def cache_key(paths: Sequence[str | Path], protocol: dict) -> str:
    """SHA-256 over the clips' contents (in order) and the protocol that produced the features."""
    digest = hashlib.sha256(json.dumps(protocol, sort_keys=True).encode())
    for path in paths:
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def _cache_file(cache_dir: Path, extractor, key: str) -> Path:
    tag = hashlib.sha256(extractor.name.encode()).hexdigest()[:12]
    family = "i3d" if isinstance(extractor, I3DVideoFeatures) else type(extractor).__name__.lower()
    return cache_dir / f"{family}-{tag}" / f"{key}.npz"


def clip_features(paths: Sequence[str | Path], load: Callable[[Path], np.ndarray], extractors: dict,
                  batch_size: int, protocol: dict, cache_dir: str | Path | None = "features",
                  desc: str = "features") -> dict[str, np.ndarray]:
    """Features of every clip for each extractor, decoding each clip once.

    `extractors` maps "video" (clip-level) and/or "frame" (applied to every frame)
    to an extractor. Cached per backbone under cache_dir (None disables the cache).
    """
    from tqdm import tqdm

    key = cache_key(paths, protocol) if cache_dir is not None else None
    files = {k: _cache_file(Path(cache_dir), e, key) for k, e in extractors.items()} if key else {}
    out = {k: np.load(f)["features"] for k, f in files.items() if f.exists()}
    todo = {k: e for k, e in extractors.items() if k not in out}
    if not todo:
        return out
    parts: dict[str, list[np.ndarray]] = {k: [] for k in todo}
    for start in tqdm(range(0, len(paths), batch_size), desc=desc, unit="batch"):
        clips = np.stack([load(Path(p)) for p in paths[start:start + batch_size]])
        for kind, ext in todo.items():
            batch = clips if kind == "video" else clips.reshape(-1, *clips.shape[2:])
            parts[kind].append(ext(batch))
    for kind in todo:
        out[kind] = np.concatenate(parts[kind])
        if kind in files:
            with atomic_path(files[kind], suffix=".npz") as tmp:
                np.savez(tmp, features=out[kind], backbone=extractors[kind].name)
    return out
