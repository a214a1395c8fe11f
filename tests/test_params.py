"""params.yaml validation: every scale validates; bad files are refused before any output."""

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from osv.cli import main
from osv.logs import unstamped
from osv.params import ParamsError, load_params

ROOT = Path(__file__).resolve().parent.parent
BASE = yaml.safe_load((ROOT / "params.yaml").read_text())


def test_shipped_params_validate():
    # the embedded default and the paper scale (workflow/scales/paper.yaml)
    for path in [ROOT / "params.yaml", *sorted((ROOT / "workflow" / "scales").glob("*.yaml"))]:
        load_params(path)


def test_run_override_is_merged():
    p = load_params(ROOT / "params.yaml", run="abl_a_m1")
    assert p["acd"]["m"] == 1
    assert load_params(ROOT / "params.yaml", run="stage2")["acd"]["m"] == BASE["acd"]["m"]


def _set(d, path, value):
    keys = path.split(".")
    for k in keys[:-1]:
        d = d[k]
    if value is _DELETE:
        del d[keys[-1]]
    else:
        d[keys[-1]] = value


_DELETE = object()

# (key to change, new value, text the error must contain)
BAD = [
    ("bogus_key", 1, "bogus_key"),
    ("lgp.bogus", 3, "lgp.bogus"),
    ("lgp.steps", -5, "lgp.steps"),
    ("acd.steps", "many", "acd.steps"),
    ("data.frames", 0, "data.frames"),
    ("scale", "huge", "scale"),
    ("acd.m", 0, "acd.m"),
    ("lgp.lr", 5.0, "lgp.lr"),
    ("data.resolution.width", 100, "data.resolution.width"),
    ("sde.sigma_min", 800.0, "sde.sigma_min"),
    ("disc.front_end", "pixels", "disc.front_end"),
    ("acd.huber_mode", "l1", "acd.huber_mode"),
    ("train.runs.stage2.init", "nowhere", "train.runs.stage2.init"),
    ("train.runs.abl_a_m1.override", {"acd": {"m": -1}}, "acd.m"),
    ("eval.methods.osv_tts.steps", 4, "eval.methods.osv_tts.steps"),
    ("eval.methods.osv_1.model", "ghost", "eval.methods.osv_1.model"),
    ("acd.resolution_schedule", [{"from_step": 5, "resolution": "low"}], "acd.resolution_schedule"),
    ("conditioning.motion_bucket_id", 300, "conditioning.motion_bucket_id"),
    ("resources.train", {"gpus": -1}, "resources.train.gpus"),
    ("teacher", _DELETE, "teacher"),
    ("vae.finetune.batch_size", 0, "vae.finetune.batch_size"),
    ("vae.steps", 0, "vae.finetune.steps"),
    ("acd.cfg.sampling", "uniform", "acd.cfg.sampling"),
    ("acd.weighting_gap", "prev", "acd.weighting_gap"),
    ("student.boundary", "soft", "student.boundary"),
    ("student.boundary", _DELETE, "boundary"),
]


@pytest.mark.parametrize("key,value,needle", BAD, ids=[b[0] for b in BAD])
def test_invalid_params_rejected_before_output(tmp_path, key, value, needle, capsys):
    bad = copy.deepcopy(BASE)
    _set(bad, key, value)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ParamsError, match=needle.replace(".", r"\.")):
        load_params(path)
    out = tmp_path / "clips"
    assert main(["data", "--params", str(path), "--out", str(out)]) == 2
    assert needle in capsys.readouterr().err
    assert not out.exists()


def test_paper_scale_rules(tmp_path):
    bad = copy.deepcopy(BASE)
    bad["scale"] = "paper"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ParamsError, match="data.source"):
        load_params(path)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    (tmp_path / "x.yaml").write_text("a: [1, 2")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(tmp_path / "x.yaml")


PAPER = yaml.safe_load((ROOT / "workflow" / "scales" / "paper.yaml").read_text())


def _write(tmp_path, params, name="params.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(params))
    return path


def _schedule(*starts):
    return [{"from_step": s, "resolution": r} for s, r in zip(starts, ["low", "high", "low"])]


# (base, key to change, new value, texts the one error line must contain): one or more per rule class
RULES = [
    # integers written as floats or booleans
    (BASE, "data.frames", 8.0, ["data.frames", "8.0"]),
    (BASE, "acd.resolution_schedule", [{"from_step": 0.0, "resolution": "low"}],
     ["acd.resolution_schedule[0].from_step", "0.0"]),
    (BASE, "acd.m", True, ["acd.m", "True"]),
    # NaN and infinity
    (BASE, "acd.lambda_adv", float("nan"), ["acd.lambda_adv", "nan"]),
    (BASE, "sde.sigma_max", float("inf"), ["sde.sigma_max", "inf"]),
    (BASE, "eval.methods.osv_1.cfg", float("-inf"), ["eval.methods.osv_1.cfg", "-inf"]),
    # stage-2 resolution switch that never takes effect (training runs steps 0 .. acd.steps - 1)
    (BASE, "acd.resolution_schedule", _schedule(0, 80), ["acd.resolution_schedule[1].from_step", "(80)"]),
    (BASE, "acd.resolution_schedule", _schedule(0, 10, 500), ["acd.resolution_schedule[2].from_step", "(500)"]),
    # low resolution above the high one
    (BASE, "data.low_resolution", {"width": 256, "height": 32}, ["data.low_resolution.width", "(256)"]),
    (BASE, "data.low_resolution", {"width": 64, "height": 128}, ["data.low_resolution.height", "(128)"]),
    # m-step teacher solve needs n + m <= num_sigmas - 1
    (BASE, "acd.m", 100, ["acd.m", "(100)", "sde.num_sigmas"]),
    # discriminator taps deeper than the backbone (embedded config: 4 blocks; dinov2-small: 12)
    (BASE, "disc.layers", [1, 4], ["disc.layers[1]", "(4)", "small_dinov2.json"]),
    (PAPER, "disc.layers", [2, 5, 8, 12], ["disc.layers[3]", "(12)", "facebook/dinov2-small"]),
    # the OpenVid test part must be downloaded (a part of data.openvid.parts)
    (PAPER, "data.openvid.test_part", 12, ["data.openvid.test_part", "(12)", "data.openvid.parts"]),
    # run graph errors name the run
    (BASE, "train.runs.stage1.init", "stage2", ["train.runs.stage1.init", "cycle stage1 -> stage2 -> stage1"]),
    (BASE, "train.runs.stage2.init", "ghost", ["train.runs.stage2.init", "'ghost'"]),
    (BASE, "eval.methods.osv_4.model", "ghost", ["eval.methods.osv_4.model", "'ghost'"]),
    # the rules hold in every run's merged override too
    (BASE, "train.runs.abl_a_m1.override", {"acd": {"m": 200}}, ["train.runs.abl_a_m1.override", "acd.m (200)"]),
    (BASE, "train.runs.abl_a_m1.override", {"acd": {"m": 2.0}}, ["train.runs.abl_a_m1.override", "acd.m", "2.0"]),
    (BASE, "train.runs.abl_a_m1.override", {"disc": {"layers": [9]}}, ["train.runs.abl_a_m1.override", "disc.layers[0]"]),
    (PAPER, "train.runs.abl_h_high_only.override", {"acd": {"steps": 5000}},
     ["train.runs.abl_h_high_only.override", "acd.resolution_schedule[1].from_step (10000)"]),
]


@pytest.mark.parametrize("base,key,value,needles", RULES, ids=[f"{r[1]}={r[2]!r}" for r in RULES])
def test_rule_names_key_and_value(tmp_path, base, key, value, needles):
    bad = copy.deepcopy(base)
    _set(bad, key, value)
    with pytest.raises(ParamsError) as exc:
        load_params(_write(tmp_path, bad))
    line = next((ln for ln in str(exc.value).splitlines() if needles[-1] in ln), "")
    assert all(n in str(exc.value) for n in needles), str(exc.value)
    assert needles[-1] in line and len(str(exc.value).splitlines()) <= 2, str(exc.value)


@pytest.mark.parametrize("key,value", [("acd.m", 99), ("disc.layers", [0, 3]), ("acd.resolution_schedule", _schedule(0, 79)),
                                       ("data.low_resolution", {"width": 128, "height": 64})])
def test_rule_bounds_are_tight(tmp_path, key, value):
    ok = copy.deepcopy(BASE)
    _set(ok, key, value)
    load_params(_write(tmp_path, ok))


@pytest.mark.parametrize("old,new,needle", [
    ("  m: 5\n", "  m: 5\n  m: 6\n", "duplicate key acd.m = 6 at line"),
    ("{from_step: 40, resolution: high}", "{from_step: 40, resolution: high, from_step: 60}",
     "duplicate key acd.resolution_schedule[1].from_step = 60"),
    ("\nseed: 0\n", "\nseed: 0\nseed: 1\n", "duplicate key seed = 1 at line 7 (first at line 6)"),
])
def test_duplicate_keys_refused(tmp_path, old, new, needle):
    text = (ROOT / "params.yaml").read_text()
    assert old in text
    path = tmp_path / "params.yaml"
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(ParamsError, match=re.escape(needle)) as exc:
        load_params(path)
    assert str(path) in str(exc.value) and "first at line" in str(exc.value)


def test_snakemake_entry_points(tmp_path):
    from osv.params import check_yaml_file, validate

    for path in (ROOT / "params.yaml", ROOT / "workflow" / "scales" / "paper.yaml"):
        validate(check_yaml_file(path), str(path))  # paper.yaml's anchors and aliases are no duplicates
    bad = copy.deepcopy(BASE)
    bad["lgp"]["steps"] = 80.0
    with pytest.raises(ParamsError, match=r"config: invalid parameters:\n  lgp\.steps: 80\.0"):
        validate(bad, "config")


def test_osv_check_command(tmp_path):
    def check(path):
        return subprocess.run([sys.executable, "-m", "osv.cli", "check", "--params", str(path)],
                              capture_output=True, text=True, cwd=ROOT)

    ok = check(ROOT / "params.yaml")
    line = unstamped(ok.stdout.strip())  # piped: osv.logs stamps the line
    assert ok.returncode == 0 and line == f"{ROOT / 'params.yaml'}: valid (10 runs, 21 methods)"
    bad = copy.deepcopy(BASE)
    bad["acd"]["m"] = 100
    fail = check(_write(tmp_path, bad))
    assert fail.returncode == 2 and "acd.m (100)" in fail.stderr and not fail.stdout
