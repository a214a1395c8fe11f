"""What each stage instance depends on: the params keys it reads and the code it runs.

One definition feeds the Snakemake rules' `params:` and code inputs, dvc.yaml's `params:` and
code `deps:` (tests/test_dag.py proves they agree), the training checkpoint fingerprint and
the params fingerprint in every provenance file. Keys are dotted paths into params.yaml.
Settings that never change results (resources, launcher, checkpoint cadence) are not keys of
any stage, so changing them reruns nothing and sets no checkpoint aside.
"""

from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent

# Keys read by every instance of a stage; per-instance keys are added in params_keys().
STAGE_KEYS = {
    "data": ["seed", "data.source", "data.frames", "data.fps", "data.resolution", "data.embedded", "data.openvid"],
    "weights": ["weights", "data.frames"],
    "vae": ["seed", "vae", "data.frames", "data.fps", "data.resolution"],
    "encode": ["seed", "encode", "data.frames", "data.fps", "data.resolution", "data.low_resolution",
               "conditioning.noise_aug_strength"],
    "teacher": ["seed", "teacher", "sde", "conditioning", "data.fps", "data.resolution", "weights.source",
                "train.precision", "train.grad_clip", "eval.batch_size"],
    "train": ["seed", "sde", "conditioning", "student", "disc", "data.fps", "data.resolution",
              "data.low_resolution", "weights.source", "train.precision", "train.grad_clip", "train.compile"],
    "generate": ["eval.seed", "eval.num_clips", "eval.batch_size", "sde", "conditioning", "data.frames", "data.fps",
                 "data.resolution", "weights.source", "student.boundary", "acd.cfg"],
    "fvd": ["scale", "eval.seed", "eval.num_clips", "eval.batch_size", "eval.fvd_backbone", "eval.fid_backbone",
            "eval.bootstrap", "data.frames", "data.fps", "data.resolution", "weights", "disc.backbone_input"],
    "claims": ["seed", "claims", "sde", "lgp", "acd", "student.boundary"],
    "report": ["eval.methods", "eval.bootstrap", "claims.level"],
}

# The stage's command module (as in osv/cli.py): its import closure is the stage's code.
STAGE_MODULES = {"data": "osv.data.prepare", "weights": "osv.weights", "vae": "osv.vae", "encode": "osv.encode",
                 "teacher": "osv.train.teacher", "train": "osv.train.distill", "generate": "osv.eval.generate",
                 "fvd": "osv.eval.fvd", "claims": "osv.experiments.claims", "report": "osv.eval.report"}

# Plumbing that decides where and how a stage runs, not what it computes: not a code dependency
# (an edit to the launcher must not rerun days of training).
PLUMBING = {"osv.cli", "osv.launch", "osv.params", "osv.atomic", "osv.provenance", "osv.dependencies",
            "osv.hub", "osv.timing", "osv.logs"}


def params_keys(stage: str, key: str | None = None, params: dict | None = None) -> list[str]:
    """Dotted params keys of one stage instance (`key`: the run of train, the method of generate/fvd)."""
    keys = list(STAGE_KEYS[stage])
    if stage == "train":
        if params is None or key is None:
            raise ValueError("train: the run's stage section needs params and the run name")
        keys += [params["train"]["runs"][key]["stage"], f"train.runs.{key}"]
    elif stage in ("generate", "fvd"):
        keys.append(f"eval.methods.{key}")
    return keys


def lookup(params: dict, dotted: str):
    value = params
    for part in dotted.split("."):
        value = value[part]
    return value


def select(params: dict, keys: list[str]) -> dict:
    return {k: lookup(params, k) for k in keys}


def fingerprint(params: dict, stage: str, key: str | None = None) -> str:
    """SHA-256 of exactly the params this stage instance reads (for a run: its merged params)."""
    keys = params_keys(stage, key, params)
    return hashlib.sha256(json.dumps(select(params, keys), sort_keys=True).encode()).hexdigest()


def _imports(path: Path) -> set[str]:
    """osv modules imported anywhere in a file (module-level and lazy imports alike)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("osv")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("osv") and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def _file(module: str) -> Path | None:
    rel = Path(*module.split("."))
    for cand in (PACKAGE.parent / rel.with_suffix(".py"), PACKAGE.parent / rel / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def code_files(stage: str) -> list[str]:
    """Repository-relative paths of the osv modules (and model configs) a stage runs, sorted."""
    seen, todo, files = set(), [STAGE_MODULES[stage]], set()
    while todo:
        module = todo.pop()
        if module in seen or module in PLUMBING:
            continue
        seen.add(module)
        path = _file(module)
        if path is None:  # a name imported from a module, not a module
            continue
        files.add(path)
        todo += sorted(_imports(path))
    if stage == "weights":  # the embedded default's small models are built from these configs
        files |= set((PACKAGE / "configs").glob("small_*.json"))
    return sorted(str(p.relative_to(PACKAGE.parent)) for p in files)


def update_dvc_yaml(path: str | Path = "dvc.yaml") -> bool:
    """Rewrite the code deps (osv/...) of every dvc.yaml stage from code_files(); True if changed.
    `python -m osv.dependencies` after adding an import; tests/test_dependencies.py checks it."""
    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)
    path = Path(path)
    doc = yaml.load(path.read_text())
    before = json.dumps(doc, default=str)
    for name, stage in doc["stages"].items():
        if name not in STAGE_MODULES:
            continue
        body = stage.get("do", stage)
        deps = [d for d in body["deps"] if not str(d).startswith("osv/")]
        body["deps"].clear()
        body["deps"].extend(deps + code_files(name))
    if json.dumps(doc, default=str) == before:
        return False
    with path.open("w") as f:
        yaml.dump(doc, f)
    return True


if __name__ == "__main__":
    print("dvc.yaml updated" if update_dvc_yaml() else "dvc.yaml already up to date")
