"""params.yaml validation: every scale validates; bad files are refused before any output."""

import copy
from pathlib import Path

import pytest
import yaml

from osv.cli import main
from osv.params import ParamsError, load_params

ROOT = Path(__file__).resolve().parent.parent
BASE = yaml.safe_load((ROOT / "params.yaml").read_text())


def test_shipped_params_validate():
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
