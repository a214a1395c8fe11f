"""Reading the encode stage's output (data/latents): index and a torch Dataset per split/resolution."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.data import Dataset

KEYS = ("latents", "cond_latents", "image_embeds", "first_frame")


def read_index(folder: str | Path) -> dict:
    """data/latents/index.json (written last by `osv encode`, so its presence means complete)."""
    path = Path(folder) / "index.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no latent index (run `osv encode` first, or it did not finish)")
    return json.loads(path.read_text())


def read_stats(folder: str | Path) -> dict:
    path = Path(folder) / "stats.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no latent statistics (run `osv encode` first)")
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
        for path in dict.fromkeys(p for p, _, _ in self.items):
            if not path.exists():
                raise FileNotFoundError(f"{path}: shard listed in {self.root}/index.json is missing")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        from safetensors import safe_open

        path, row, cid = self.items[i]
        with safe_open(str(path), "pt") as f:
            out = {k: f.get_slice(k)[row:row + 1][0] for k in KEYS}
        out["clip_id"] = cid
        return out

    def clip_ids(self) -> list[str]:
        return [cid for _, _, cid in self.items]


def collate(batch: list[dict]) -> dict:
    """Stack tensors, keep clip ids as a list (for torch DataLoader)."""
    out = {k: torch.stack([b[k] for b in batch]) for k in KEYS}
    out["clip_id"] = [b["clip_id"] for b in batch]
    return out
