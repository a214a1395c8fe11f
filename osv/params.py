"""Load and validate params.yaml against workflow/schemas/params.schema.yaml.

Every `osv` command calls `load_params` first, so bad input is refused with the
offending key path before any output is written. `validate` and
`check_yaml_file` give the Snakefile the same gate; `osv check` runs it alone.
"""

from __future__ import annotations

import copy
import functools
import json
import math
from importlib import resources
from pathlib import Path

import jsonschema
import yaml

SCHEMA_NAME = "params.schema.yaml"
# Blocks of the hub DINOv2 backbones (config.num_hidden_layers); other repos are checked when built.
HUB_DINOV2_LAYERS = {"facebook/dinov2-small": 12, "facebook/dinov2-base": 12,
                     "facebook/dinov2-large": 24, "facebook/dinov2-giant": 40}


class ParamsError(ValueError):
    """A params file that does not satisfy the schema or a cross-key rule."""


def schema_path() -> Path:
    """The schema lives in workflow/schemas; the package carries a copy when installed non-editable."""
    repo = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / SCHEMA_NAME
    if repo.exists():
        return repo
    return Path(str(resources.files("osv") / "configs" / SCHEMA_NAME))


def load_schema() -> dict:
    return copy.deepcopy(_schema())


@functools.lru_cache(maxsize=1)
def _schema() -> dict:
    """Parsed once per process: validate() checks every run's merged override against it, and
    re-reading the YAML each time cost 0.4 s of every job's start-up. libyaml's loader where built."""
    return yaml.load(schema_path().read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


@functools.lru_cache(maxsize=1)
def _validator():
    return Validator(_schema())


def _is_int(checker, value) -> bool:
    # jsonschema counts 8.0 as an integer; a float where a count is expected is a typo.
    return isinstance(value, int) and not isinstance(value, bool)


Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_int))


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice in one mapping (plain YAML keeps the last)."""

    def construct_document(self, node):
        _refuse_duplicates(node, [], set())
        return super().construct_document(node)


def _refuse_duplicates(node, path: list, visited: set) -> None:
    if id(node) in visited:  # an alias: already checked where its anchor is
        return
    visited.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first = {}
        for key, value in node.value:
            if key.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` keys may be overridden
                _refuse_duplicates(value, path, visited)
                continue
            ident = (key.tag, key.value) if isinstance(key, yaml.ScalarNode) else id(key)
            if ident in first:
                shown = f" = {value.value}" if isinstance(value, yaml.ScalarNode) else ""
                raise ParamsError(f"{key.start_mark.name}: duplicate key {_path([*path, key.value])}{shown} at line "
                                  f"{key.start_mark.line + 1} (first at line {first[ident]})")
            first[ident] = key.start_mark.line + 1
            _refuse_duplicates(value, [*path, key.value], visited)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicates(item, [*path, i], visited)


def _path(parts) -> str:
    """['acd', 'resolution_schedule', 1, 'from_step'] -> acd.resolution_schedule[1].from_step"""
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else f".{p}" if out else str(p)
    return out or "<top level>"


def deep_merge(base: dict, override: dict) -> dict:
    """Return base with override merged in recursively (lists and scalars replace)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _describe(err: jsonschema.ValidationError) -> str:
    path = _path(err.absolute_path)
    if err.validator == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
        extra = sorted(set(err.instance) - set(allowed)) if isinstance(err.instance, dict) else []
        keys = ", ".join(_path([*err.absolute_path, k]) for k in extra)
        return f"unknown key {keys} (allowed: {', '.join(allowed)})"
    if err.validator == "required":
        return f"{path}: {err.message}"
    bounds = {k: err.schema[k] for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
                                         "enum", "type", "pattern", "multipleOf") if k in err.schema}
    hint = f" (allowed: {bounds})" if bounds else ""
    return f"{path}: {err.message}{hint}"


def _nonfinite(value, path: list) -> list[str]:
    """NaN and infinity pass every schema bound (comparisons with NaN are false): refuse them anywhere."""
    if isinstance(value, float) and not math.isfinite(value):
        return [f"{_path(path)}: {value} is not a finite number"]
    if isinstance(value, dict):
        return [line for k, v in value.items() for line in _nonfinite(v, [*path, k])]
    if isinstance(value, list):
        return [line for i, v in enumerate(value) for line in _nonfinite(v, [*path, i])]
    return []


def _schema_problems(params: dict) -> list[str]:
    problems = _nonfinite(params, [])
    if problems:
        return problems
    errors = sorted(_validator().iter_errors(params), key=lambda e: list(map(str, e.absolute_path)))
    return [_describe(e) for e in errors]


def _raise(source: str, problems: list[str]) -> None:
    if problems:
        raise ParamsError(f"{source}: invalid parameters:\n  " + "\n  ".join(problems))


def validate(params: dict, source: str = "params") -> dict:
    """Validate a params dict; raise ParamsError naming every offending key."""
    _raise(source, _schema_problems(params))
    _check_rules(params, source)
    for name, run in params["train"]["runs"].items():
        if run.get("override"):
            validate_merged(params, run["override"], f"{source}: train.runs.{name}.override")
    return params


def validate_merged(params: dict, override: dict, source: str) -> dict:
    if "train" in override and "runs" in override["train"]:
        raise ParamsError(f"{source}: an override may not change train.runs")
    merged = deep_merge(params, override)
    _raise(source, _schema_problems(merged))
    _check_rules(merged, source)
    return merged


def _check_rules(p: dict, source: str) -> None:
    """Rules a JSON schema cannot say: references between keys and orderings."""
    _raise(source, [*_basic_rules(p), *_stage2_rules(p), *_disc_rules(p), *_run_graph_rules(p),
                    *_eval_rules(p), *_paper_rules(p)])


def _basic_rules(p: dict) -> list[str]:
    problems = []
    sde = p["sde"]
    if sde["sigma_min"] >= sde["sigma_max"]:
        problems.append(f"sde.sigma_min ({sde['sigma_min']}) must be below sde.sigma_max ({sde['sigma_max']})")
    if p["vae"]["finetune"]["steps"] and not p["vae"]["steps"]:
        problems.append(f"vae.finetune.steps ({p['vae']['finetune']['steps']}) must be 0 when vae.steps is 0 "
                        "(nothing is trained: the VAE is copied)")
    high, low = p["data"]["resolution"], p["data"]["low_resolution"]
    for side in ("width", "height"):
        if low[side] > high[side]:
            problems.append(f"data.low_resolution.{side} ({low[side]}) must not exceed data.resolution.{side} "
                            f"({high[side]})")
    return problems


def _stage2_rules(p: dict) -> list[str]:
    problems, acd = [], p["acd"]
    sched = acd["resolution_schedule"]
    if sched[0]["from_step"] != 0:
        problems.append("acd.resolution_schedule[0].from_step must be 0")
    starts = [s["from_step"] for s in sched]
    if starts != sorted(set(starts)):
        problems.append(f"acd.resolution_schedule: from_step values must increase strictly, got {starts}")
    for i, start in enumerate(starts[1:], 1):
        if start >= acd["steps"]:  # training runs steps 0 .. acd.steps - 1
            problems.append(f"acd.resolution_schedule[{i}].from_step ({start}) must be below acd.steps "
                            f"({acd['steps']}): the switch would never take effect")
    # The teacher solve draws n in [0, N - m) and reads sigmas[n + m], so it needs m <= N - 1.
    if acd["m"] >= p["sde"]["num_sigmas"]:
        problems.append(f"acd.m ({acd['m']}) must be below sde.num_sigmas ({p['sde']['num_sigmas']}): "
                        "the teacher solve spans sigma_n .. sigma_(n+m)")
    if acd["cfg"]["min"] > acd["cfg"]["max"]:
        problems.append("acd.cfg.min must not exceed acd.cfg.max")
    ov = p["data"]["openvid"]
    if p["data"]["source"] == "openvid" and ov["test_part"] not in ov["parts"]:
        problems.append(f"data.openvid.test_part ({ov['test_part']}) must be one of data.openvid.parts "
                        f"{list(ov['parts'])}: the test clips come from that part")
    return problems


def _dinov2_blocks(weights: dict) -> tuple[int | None, str]:
    if weights["source"] == "config" and weights["architecture"] == "svd":  # osv.models.DINOV2_SMALL
        return HUB_DINOV2_LAYERS["facebook/dinov2-small"], "DINOv2-small, weights.architecture svd"
    if weights["source"] == "config":
        config = json.loads((resources.files("osv") / "configs" / "small_dinov2.json").read_text())
        return config["num_hidden_layers"], "osv/configs/small_dinov2.json"
    repo = weights["dinov2"]["repo_id"]
    return HUB_DINOV2_LAYERS.get(repo), repo


def _disc_rules(p: dict) -> list[str]:
    # Layer l taps hidden_states[l + 1] (index 0 is the embeddings), so l must be < num_hidden_layers.
    blocks, backbone = _dinov2_blocks(p["weights"])
    if blocks is None:
        return []
    return [f"disc.layers[{i}] ({layer}) must be below {blocks}, the number of blocks of the DINOv2 "
            f"backbone ({backbone}; layers are 0-based)"
            for i, layer in enumerate(p["disc"]["layers"]) if layer >= blocks]


def _run_graph_rules(p: dict) -> list[str]:
    runs = p["train"]["runs"]
    problems = [f"train.runs.{name}.init: unknown run '{run['init']}' (use 'teacher' or one of {sorted(runs)})"
                for name, run in runs.items() if run["init"] != "teacher" and run["init"] not in runs]
    return problems + _cycles(runs)


def _eval_rules(p: dict) -> list[str]:
    problems, runs = [], p["train"]["runs"]
    for name, method in p["eval"]["methods"].items():
        if method["model"] != "teacher" and method["model"] not in runs:
            problems.append(f"eval.methods.{name}.model: unknown model '{method['model']}' "
                            f"(use 'teacher' or one of train.runs {sorted(runs)})")
        if method["sampler"] == "tts" and method["steps"] != 1:
            problems.append(f"eval.methods.{name}.steps: the Time Travel Sampler is 1 step, got {method['steps']}")
        if method["sampler"] == "teacher" and method["model"] != "teacher":
            problems.append(f"eval.methods.{name}: sampler 'teacher' needs model 'teacher'")
        if method["sampler"] != "teacher" and method["model"] == "teacher":
            problems.append(f"eval.methods.{name}: model 'teacher' needs sampler 'teacher'")
    return problems


def _paper_rules(p: dict) -> list[str]:
    problems = []
    if p["scale"] == "paper":
        for key, want in (("data.source", "openvid"), ("weights.source", "hub")):
            section, field = key.split(".")
            if p[section][field] != want:
                problems.append(f"{key}: scale 'paper' needs '{want}', got '{p[section][field]}'")
        for key in ("vae.steps", "teacher.steps"):
            section, field = key.split(".")
            if p[section][field] != 0:
                problems.append(f"{key}: scale 'paper' uses the pretrained SVD weights, so it must be 0")
    return problems


def _cycles(runs: dict) -> list[str]:
    """Each init cycle once, named by its first run (runs that merely start from a cycle are not repeated)."""
    problems, reported = [], set()
    for name in runs:
        chain, cur = [name], runs[name]["init"]
        while cur in runs and cur not in chain:
            chain.append(cur)
            cur = runs[cur]["init"]
        if cur == name and frozenset(chain) not in reported:
            reported.add(frozenset(chain))
            problems.append(f"train.runs.{name}.init: cycle {' -> '.join([*chain, name])}")
    return problems


def check_yaml_file(path: str | Path) -> dict:
    """Parse a params file, refusing duplicate keys; return the top-level mapping (not yet validated)."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: params file not found")
    try:
        with path.open() as f:  # a file stream names the path in the loader's marks
            params = yaml.load(f, Loader=UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(params, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level")
    return params


def load_params(path: str | Path = "params.yaml", run: str | None = None) -> dict:
    """Read, validate and (for a training run) merge that run's override."""
    params = validate(check_yaml_file(path), str(path))
    if run is None:
        return params
    if run not in params["train"]["runs"]:
        raise ParamsError(f"{path}: unknown run '{run}' (train.runs has {sorted(params['train']['runs'])})")
    return deep_merge(params, params["train"]["runs"][run].get("override", {}))


def resources_for(params: dict, stage: str) -> dict:
    """SLURM resources of a stage: resources.<stage> over resources.default."""
    res = params["resources"]
    return {**res["default"], **res.get(stage, {})}


def command(args) -> int:
    params = load_params(args.params)
    print(f"{args.params}: valid ({len(params['train']['runs'])} runs, {len(params['eval']['methods'])} methods)")
    if args.out:  # constant content: the stages after dvc.yaml's check stage only rerun for their own params
        from osv.atomic import write_text

        write_text(args.out, "valid\n")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("check", help="validate params.yaml (schema, cross-key rules, every run's override)")
    p.add_argument("--params", default="params.yaml", help="params file")
    p.add_argument("--out", default=None, help="write a marker file when valid (dvc.yaml's check stage)")
    p.set_defaults(func=command)
