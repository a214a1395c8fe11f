"""Load and validate params.yaml against workflow/schemas/params.schema.yaml.

Every `osv` command calls `load_params` first, so bad input is refused with the
offending key path before any output is written.
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path

import jsonschema
import yaml

SCHEMA_NAME = "params.schema.yaml"


class ParamsError(ValueError):
    """A params file that does not satisfy the schema or a cross-key rule."""


def schema_path() -> Path:
    """The schema lives in workflow/schemas; the package carries a copy when installed non-editable."""
    repo = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / SCHEMA_NAME
    if repo.exists():
        return repo
    return Path(str(resources.files("osv") / "configs" / SCHEMA_NAME))


def load_schema() -> dict:
    return yaml.safe_load(schema_path().read_text())


def deep_merge(base: dict, override: dict) -> dict:
    """Return base with override merged in recursively (lists and scalars replace)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _describe(err: jsonschema.ValidationError, schema: dict) -> str:
    path = ".".join(str(p) for p in err.absolute_path) or "<top level>"
    if err.validator == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
        extra = sorted(set(err.instance) - set(allowed)) if isinstance(err.instance, dict) else []
        keys = ", ".join(f"{path}.{k}" if path != "<top level>" else k for k in extra)
        return f"unknown key {keys} (allowed: {', '.join(allowed)})"
    if err.validator == "required":
        return f"{path}: {err.message}"
    bounds = {k: err.schema[k] for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
                                         "enum", "type", "pattern", "multipleOf") if k in err.schema}
    hint = f" (allowed: {bounds})" if bounds else ""
    return f"{path}: {err.message}{hint}"


def validate(params: dict, source: str = "params") -> dict:
    """Validate a params dict; raise ParamsError naming every offending key."""
    schema = load_schema()
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(params), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = "\n  ".join(_describe(e, schema) for e in errors)
        raise ParamsError(f"{source}: invalid parameters:\n  {lines}")
    _check_rules(params, source)
    for name, run in params["train"]["runs"].items():
        if run.get("override"):
            validate_merged(params, run["override"], f"{source}: train.runs.{name}.override")
    return params


def validate_merged(params: dict, override: dict, source: str) -> dict:
    merged = deep_merge({k: v for k, v in params.items()}, override)
    if "train" in override and "runs" in override["train"]:
        raise ParamsError(f"{source}: an override may not change train.runs")
    schema = load_schema()
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(merged))
    if errors:
        raise ParamsError(f"{source}: " + "; ".join(_describe(e, schema) for e in errors))
    _check_rules(merged, source)
    return merged


def _check_rules(p: dict, source: str) -> None:
    """Rules a JSON schema cannot say: references between keys and orderings."""
    problems = []
    sde = p["sde"]
    if sde["sigma_min"] >= sde["sigma_max"]:
        problems.append(f"sde.sigma_min ({sde['sigma_min']}) must be below sde.sigma_max ({sde['sigma_max']})")
    if p["vae"]["finetune"]["steps"] and not p["vae"]["steps"]:
        problems.append(f"vae.finetune.steps ({p['vae']['finetune']['steps']}) must be 0 when vae.steps is 0 "
                        "(nothing is trained: the VAE is copied)")
    sched = p["acd"]["resolution_schedule"]
    if sched[0]["from_step"] != 0:
        problems.append("acd.resolution_schedule[0].from_step must be 0")
    starts = [s["from_step"] for s in sched]
    if starts != sorted(set(starts)):
        problems.append(f"acd.resolution_schedule: from_step values must increase strictly, got {starts}")
    if p["acd"]["cfg"]["min"] > p["acd"]["cfg"]["max"]:
        problems.append("acd.cfg.min must not exceed acd.cfg.max")
    runs = p["train"]["runs"]
    for name, run in runs.items():
        if run["init"] != "teacher" and run["init"] not in runs:
            problems.append(f"train.runs.{name}.init: unknown run '{run['init']}' (use 'teacher' or one of {sorted(runs)})")
    problems += _cycles(runs)
    for name, method in p["eval"]["methods"].items():
        if method["model"] != "teacher" and method["model"] not in runs:
            problems.append(f"eval.methods.{name}.model: unknown model '{method['model']}'")
        if method["sampler"] == "tts" and method["steps"] != 1:
            problems.append(f"eval.methods.{name}.steps: the Time Travel Sampler is 1 step, got {method['steps']}")
        if method["sampler"] == "teacher" and method["model"] != "teacher":
            problems.append(f"eval.methods.{name}: sampler 'teacher' needs model 'teacher'")
        if method["sampler"] != "teacher" and method["model"] == "teacher":
            problems.append(f"eval.methods.{name}: model 'teacher' needs sampler 'teacher'")
    if p["scale"] == "paper":
        for key, want in (("data.source", "openvid"), ("weights.source", "hub")):
            section, field = key.split(".")
            if p[section][field] != want:
                problems.append(f"{key}: scale 'paper' needs '{want}', got '{p[section][field]}'")
        for key in ("vae.steps", "teacher.steps"):
            section, field = key.split(".")
            if p[section][field] != 0:
                problems.append(f"{key}: scale 'paper' uses the pretrained SVD weights, so it must be 0")
    if problems:
        raise ParamsError(f"{source}: invalid parameters:\n  " + "\n  ".join(problems))


def _cycles(runs: dict) -> list[str]:
    problems = []
    for name in runs:
        seen, cur = [name], runs[name]["init"]
        while cur in runs:
            if cur in seen:
                problems.append(f"train.runs.{name}.init: cycle {' -> '.join([*seen, cur])}")
                break
            seen.append(cur)
            cur = runs[cur]["init"]
    return problems


def load_params(path: str | Path = "params.yaml", run: str | None = None) -> dict:
    """Read, validate and (for a training run) merge that run's override."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: params file not found")
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(params, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level")
    validate(params, str(path))
    if run is None:
        return params
    if run not in params["train"]["runs"]:
        raise ParamsError(f"{path}: unknown run '{run}' (train.runs has {sorted(params['train']['runs'])})")
    return deep_merge(params, params["train"]["runs"][run].get("override", {}))


def resources_for(params: dict, stage: str) -> dict:
    """SLURM resources of a stage: resources.<stage> over resources.default."""
    res = params["resources"]
    return {**res["default"], **res.get(stage, {})}
