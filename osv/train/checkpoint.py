"""Training checkpoints: runs/RUN/checkpoints/step-XXXXXXX/ (docs/design.md).

A checkpoint folder holds one safetensors file per weight group (student trainable state,
EMA, discriminator trainable state), `state.pt` (optimizer and GradScaler states, step, RNG
states, data-order state; plain tensors/containers so torch.load(weights_only=True) reads it)
and `curves.csv` (the training curve so far, so a resumed run's plot is complete). Folders
are written atomically (temp dir, then rename), so every `step-*` folder is complete, and
`manifest.json` lists the size and SHA-256 of every other file in it, so a folder damaged
later (truncated, changed, a file lost) is detected on load; `load_latest_good` then moves
it to runs/RUN/corrupt/ and falls back to the previous checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from osv.atomic import atomic_path
from osv.hub import sha256_file

STEP_DIR = re.compile(r"^step-(\d{7})$")
STATE_FILE = "state.pt"
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint folder whose files are missing, truncated, changed or unreadable."""


def checkpoints_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


FINGERPRINT = "params.sha256"


def set_aside_stale(run_dir: str | Path, fingerprint: str) -> Path | None:
    """Move checkpoints written under other params to run_dir/stale/<their hash>/ and return that folder.

    The checkpoint folder persists across `dvc repro` (persist: true), so a run whose params
    changed must not resume from the old run's steps; nothing is deleted.
    """
    latest = latest_checkpoint(run_dir)
    if latest is None:
        return None
    old = (latest / FINGERPRINT).read_text().strip() if (latest / FINGERPRINT).exists() else "unknown"
    if old == fingerprint:
        return None
    dest = Path(run_dir) / "stale" / old[:16]
    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(checkpoints_root(run_dir), dest)
    return dest


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders, oldest first (temp folders of an interrupted write are skipped)."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir: str | Path, step: int, weights: dict[str, dict[str, torch.Tensor]], state: dict,
                    keep_last: int, texts: dict[str, str] | None = None) -> Path:
    """Write step-XXXXXXX/ atomically, then delete all but the newest `keep_last`."""
    from safetensors.torch import save_file

    path = checkpoints_root(run_dir) / f"step-{step:07d}"
    with atomic_path(path) as tmp:
        tmp.mkdir()
        for name, tensors in weights.items():
            cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
            save_file(cpu, str(tmp / f"{name}.safetensors"), metadata={"step": str(step)})
        torch.save(state, tmp / STATE_FILE)
        for name, text in (texts or {}).items():
            (tmp / name).write_text(text)
        files = {f.relative_to(tmp).as_posix(): {"size": f.stat().st_size, "sha256": sha256_file(f)}
                 for f in sorted(tmp.rglob("*")) if f.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({"files": files}, indent=2, sort_keys=True) + "\n")
    # The newest folder was just written and hashed, so pruning never keeps a bad one over a good one.
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def verify_checkpoint(path: str | Path) -> bool:
    """Raise CheckpointError naming the first file that differs from the folder's manifest;
    False (with a warning) for a folder written before checkpoints carried a manifest."""
    path = Path(path)
    manifest = path / MANIFEST
    if not manifest.exists():
        warnings.warn(f"{path}: no {MANIFEST}, loading it unverified", stacklevel=3)
        return False
    try:
        listed = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{manifest}: unreadable ({exc})") from exc
    for name, want in listed.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (listed in {MANIFEST})")
        if f.stat().st_size != want["size"]:
            raise CheckpointError(f"{f}: truncated or grown: {f.stat().st_size} bytes, "
                                  f"{MANIFEST} says {want['size']}")
        if (got := sha256_file(f)) != want["sha256"]:
            raise CheckpointError(f"{f}: content changed: sha256 {got}, {MANIFEST} says {want['sha256']}")
    extra = [name for name in sorted(f.relative_to(path).as_posix() for f in path.rglob("*") if f.is_file())
             if name != MANIFEST and name not in listed]
    if extra:
        raise CheckpointError(f"{path}: files not in {MANIFEST}: {extra}")
    return True


def load_checkpoint(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict, dict[str, str]]:
    """(weights by group, state, text files) of one checkpoint folder, verified against its manifest."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no {STATE_FILE})")
    verified = verify_checkpoint(path)

    def read(f: Path, reader):
        try:
            return reader(f)
        except Exception as exc:
            if verified:  # the bytes are as written: a code problem, not a damaged folder
                exc.add_note(f"while reading {f}")
                raise
            raise CheckpointError(f"{f}: unreadable ({type(exc).__name__}: {exc})") from exc

    weights = {f.stem: read(f, lambda f: load_file(str(f))) for f in sorted(path.glob("*.safetensors"))}
    state = read(path / STATE_FILE, lambda f: torch.load(f, map_location="cpu", weights_only=True))
    texts = {f.name: read(f, Path.read_text) for f in sorted(path.glob("*.csv"))}
    return weights, state, texts


def load_latest_good(run_dir: str | Path) -> tuple[Path | None, tuple | None]:
    """(path, load_checkpoint(path)) of the newest checkpoint that verifies, else (None, None).

    Each newer one that fails is moved to run_dir/corrupt/ (never deleted) with a warning.
    """
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as exc:
            dest = Path(run_dir) / "corrupt" / path.name
            n = 1
            while dest.exists():
                n += 1
                dest = dest.with_name(f"{path.name}.{n}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):  # another rank moved it first
                os.replace(path, dest)
            warnings.warn(f"checkpoint {path} is damaged, moved to {dest}: {exc}", stacklevel=2)
    return None, None


def rng_state() -> dict:
    """torch, numpy, python (and CUDA) generator states as weights_only-loadable containers."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "state": list(py_state), "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["gauss"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
