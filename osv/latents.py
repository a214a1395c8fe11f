"""Reading the encode stage's output (data/latents): index and a torch Dataset per split/resolution."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.data import Dataset

from osv.hub import sha256_file

KEYS = ("latents", "cond_latents", "image_embeds", "first_frame")


class ShardError(RuntimeError):
    """A latent shard that is unreadable or differs from the content hash in index.json."""


def check_shard(path: Path, sha256: str | None) -> str | None:
    """Why the shard at `path` is not what `osv encode` wrote (None when it is, or when the
    index predates content hashes and gives none)."""
    if sha256 is None:
        return None
    got = sha256_file(path)
    if got != sha256:
        return (f"{path}: shard changed or truncated since `osv encode` wrote it (sha256 {got}, "
                f"index.json says {sha256}); re-run `osv encode`")
    return None


def _unreadable(path: Path, exc: Exception) -> ShardError:
    return ShardError(f"{path}: cannot read latent shard ({type(exc).__name__}: {exc}); re-run `osv encode`")


def load_shard(path: Path, sha256: str | None) -> dict[str, torch.Tensor]:
    """All tensors of one shard, checked against its content hash."""
    from safetensors.torch import load_file

    if problem := check_shard(path, sha256):
        raise ShardError(problem)
    try:
        return load_file(str(path))
    except Exception as exc:
        raise _unreadable(path, exc) from exc


def read_index(folder: str | Path) -> dict:
    """data/latents/index.json (written last by `osv encode`, so its presence means complete)."""
    path = Path(folder) / "index.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no latent index (run `osv encode` first, or it did not finish)")
    return json.loads(path.read_text())


class LatentDataset(Dataset):
    """Clips of one split at one resolution: dicts {latents, cond_latents, image_embeds, first_frame, clip_id}.

    Rows are read lazily from the memory-mapped safetensors shards, so the same
    class serves a few embedded clips and a large paper-scale set.
    """

    def __init__(self, root: str | Path, split: str, width: int, height: int):
        self.root = Path(root)
        self.index = read_index(self.root)
        name = f"{split}/{width}x{height}"
        if name not in self.index["groups"]:
            raise KeyError(f"{self.root}/index.json: no latents for {name} (have {sorted(self.index['groups'])})")
        self.group = self.index["groups"][name]
        folder = self.root / self.group["folder"]
        self.items = [(folder / s["file"], row, cid)
                      for s in self.group["shards"] for row, cid in enumerate(s["clip_ids"])]
        self.sha256 = {folder / s["file"]: s.get("sha256") for s in self.group["shards"]}
        self.problems: dict[Path, str | None] = {}  # shard -> check_shard verdict, once per process
        for path in self.sha256:
            if not path.exists():
                raise FileNotFoundError(f"{path}: shard listed in {self.root}/index.json is missing")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        from safetensors import safe_open

        path, row, cid = self.items[i]
        # Hashed on first use, not in __init__: paper-scale shards are GBs each.
        if path not in self.problems:
            self.problems[path] = check_shard(path, self.sha256[path])
        if self.problems[path]:
            raise ShardError(self.problems[path])
        try:
            with safe_open(str(path), "pt") as f:
                out = {k: f.get_slice(k)[row:row + 1][0] for k in KEYS}
        except Exception as exc:
            raise _unreadable(path, exc) from exc
        out["clip_id"] = cid
        return out

    def clip_ids(self) -> list[str]:
        return [cid for _, _, cid in self.items]
