"""Metric files hold numbers only; what produced them goes to a provenance file beside them.

`metrics/X.json` is what `dvc metrics show/diff` compares (every leaf a finite number, or the
stage stops); `metrics/X.provenance.json` says which commit (and whether code or params were
edited since), which params fingerprint, precision, device and weights made those numbers,
plus the stage's text results (protocol, warnings).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from osv.atomic import write_json
from osv.numerics import NonFiniteError

# What makes a run differ from its commit: code, pipeline definition and params.
SOURCE_PATHS = ["osv", "workflow", "Snakefile", "dvc.yaml", "params.yaml", "pyproject.toml", "requirements.lock"]


def provenance_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(f"{path.stem}.provenance.json")


def git_state(cwd: str | Path = ".") -> dict:
    """{"commit", "dirty"}; both None outside a git work tree."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", *SOURCE_PATHS))
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def record(params: dict, stage: str, key: str | None = None, *, precision: str, device: str = "cpu",
           weights: str | None = None) -> dict:
    """The provenance of one stage instance's outputs."""
    from osv import __version__
    from osv.dependencies import fingerprint

    return {"stage": stage, "instance": key, **git_state(), "params_sha256": fingerprint(params, stage, key),
            "precision": precision, **_device(device), "torch": _torch_version(), "osv": __version__,
            "weights": weights or weights_description(params)}


def _device(device: str) -> dict:
    """osv.precision.describe_device, without importing torch (1.4 s) in a stage that never loaded it
    (report): its threads are then the ones it was granted (osv.timing.compute_threads)."""
    from osv.precision import cpu_name, describe_device, precision_flags
    from osv.timing import compute_threads

    if "torch" in sys.modules:
        return describe_device(device)
    return {"device": device, "cpu": cpu_name(), "threads": compute_threads(), "cpu_flags": precision_flags()}


def _torch_version() -> str | None:
    if "torch" in sys.modules:
        return sys.modules["torch"].__version__
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:
        return None


def weights_description(params: dict) -> str:
    w = params["weights"]
    if w["source"] == "config" and w["architecture"] == "svd":
        return "SVD img2vid architecture, random init (NOT the real SVD/DINOv2 weights): paper-smoke, not a result"
    if w["source"] == "config":
        return "small models built from osv/configs with random weights (embedded default, not SVD)"
    return f"{w['teacher']['repo_id']}@{w['teacher']['revision']}"


def split(result: dict) -> tuple[dict, dict]:
    """(numeric leaves, everything else), both keeping the nesting; booleans and None are not numbers."""
    numbers, other = {}, {}
    for k, v in result.items():
        if isinstance(v, dict):
            n, o = split(v)
            if n:
                numbers[k] = n
            if o:
                other[k] = o
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            numbers[k] = v
        else:
            other[k] = v
    return numbers, other


def _non_finite(numbers: dict, prefix: str = "") -> list[str]:
    bad = []
    for k, v in numbers.items():
        if isinstance(v, dict):
            bad += _non_finite(v, f"{prefix}{k}.")
        elif not math.isfinite(v):
            bad.append(f"{prefix}{k}={v}")
    return bad


def require_finite_metrics(stage: str, result: dict, path: str | Path) -> None:
    """Call before writing a stage's other outputs, so a NaN metric leaves nothing complete-looking."""
    bad = _non_finite(split(result)[0])
    if bad:
        raise NonFiniteError(f"osv {stage}: non-finite metric {', '.join(bad)}; {path} not written")


def write_metrics(path: str | Path, result: dict, provenance: dict) -> None:
    """Numbers to `path`, the rest with the provenance beside it; a non-finite number writes nothing.
    The provenance also gets this process's timing (osv.timing): write_metrics runs where the stage's
    work runs (in-process or in its submitit job), at its end."""
    from osv.timing import measure

    require_finite_metrics(provenance["stage"], result, path)
    numbers, text = split(result)
    write_json(provenance_path(path), {**provenance, "timing": measure(), "results": text})
    write_json(path, numbers)


def read_metrics(path: str | Path) -> dict:
    """A metric file with its provenance's text results merged back in (for the report)."""
    path = Path(path)
    out = json.loads(path.read_text())
    prov = provenance_path(path)
    if prov.exists():
        _merge(out, json.loads(prov.read_text()).get("results", {}))
    return out


def _merge(into: dict, extra: dict) -> None:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v
