"""One definition of what each stage instance depends on (osv/dependencies.py), used by the
Snakemake rules, dvc.yaml and the checkpoint fingerprint; rerun scope measured with real DVC."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from osv.dependencies import STAGE_KEYS, code_files, fingerprint, params_keys
from osv.params import load_params

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
PARAMS = load_params(ROOT / "params.yaml")


def dvc_stage_deps(root: Path) -> dict:
    """{(stage, key): (params keys, code files)} as DVC resolves dvc.yaml."""
    from dvc.repo import Repo

    out = {}
    with Repo(str(root)) as repo:
        for stage in repo.index.stages:
            name, _, key = stage.addressing.partition("@")
            keys = [k for d in stage.deps if hasattr(d, "params") for k in d.params]
            code = sorted(str(d.def_path) for d in stage.deps if str(d.def_path).startswith("osv/"))
            out[(name, key or None)] = (keys, code)
    return out


def test_dvc_yaml_params_and_code_are_osv_dependencies():
    stages = dvc_stage_deps(ROOT)
    assert {name for name, _ in stages} == set(STAGE_KEYS) | {"check"}
    for (name, key), (keys, code) in stages.items():
        if name == "check":
            continue
        assert keys == params_keys(name, key, PARAMS), f"dvc.yaml {name}@{key} params"
        assert code == code_files(name), f"dvc.yaml {name}@{key} code deps differ: run `python -m osv.dependencies`"


def test_snakemake_rules_take_params_from_osv_dependencies():
    """Every rule's params are stage_params(<its stage>) (common.smk: select(config, params_keys(...)))."""
    text = "".join(p.read_text() for p in sorted((ROOT / "workflow" / "rules").glob("*.smk")))
    rules = re.findall(r"^rule (\w+):\n((?:    .*\n|\n)*)", text, flags=re.M)
    stage = {r: r.removesuffix("_part") for r, _ in rules}  # a stage's fan-out parts read what it reads
    assert set(stage.values()) == set(STAGE_KEYS)
    for rule, body in rules:
        assert f'deps=stage_params("{stage[rule]}")' in body, rule
        assert f'code=code_files("{stage[rule]}")' in body, rule


def test_stage_code_is_its_import_closure():
    assert "osv/samplers.py" in code_files("generate") and "osv/samplers.py" in code_files("train")
    assert "osv/samplers.py" not in code_files("fvd") and "osv/samplers.py" not in code_files("vae")
    assert "osv/eval/frechet.py" in code_files("fvd") and "osv/vae.py" in code_files("vae")
    for stage in STAGE_KEYS:  # where a stage runs is not what it computes
        assert "osv/launch.py" not in code_files(stage)


def merged(params: dict, run: str) -> dict:
    from osv.params import deep_merge

    return deep_merge(params, params["train"]["runs"][run].get("override", {}))


def test_fingerprint_ignores_resources_launcher_and_eval():
    before = {run: fingerprint(merged(PARAMS, run), "train", run) for run in PARAMS["train"]["runs"]}
    p = copy.deepcopy(PARAMS)
    p["resources"]["train"] = {"partition": "other", "timeout_min": 5}
    p["eval"]["methods"]["new"] = {"model": "stage2", "sampler": "consistency", "steps": 3}
    p["eval"]["num_clips"] = 99
    p["train"]["checkpoint_every"] = 7
    assert {run: fingerprint(merged(p, run), "train", run) for run in p["train"]["runs"]} == before
    p["acd"]["m"] = 3  # stage-2 runs read it, stage-1 runs do not
    after = {run: fingerprint(merged(p, run), "train", run) for run in p["train"]["runs"]}
    for run, spec in p["train"]["runs"].items():
        changed = spec["stage"] == "acd" and "m" not in spec.get("override", {}).get("acd", {})
        assert (after[run] != before[run]) == changed, run


# ---------------------------------------------------------------- rerun scope, real DVC


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory):
    """A copy of the repository's tracked files with every stage's outputs stand-ins and a dvc.lock
    committed for them (`dvc commit`): `dvc status` then says what a params or code edit reruns."""
    repo = tmp_path_factory.mktemp("dvcrepo")
    for rel in subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split():
        if (ROOT / rel).is_file():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, repo / rel)
    git = lambda *a: subprocess.run(["git", *a], cwd=repo, check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init", "--allow-empty")
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc:
        for stage in dvc.index.stages:
            for out in stage.outs:
                path = repo / str(out.def_path)
                if path.suffix in (".json", ".csv", ".md", ".png") or path.name == "params-valid":
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text("{}\n" if path.suffix == ".json" else "step,loss\n0,1\n")
                else:
                    path.mkdir(parents=True, exist_ok=True)
                    (path / "stand-in").write_text(str(out.def_path))
    done = subprocess.run([BIN / "dvc", "commit", "--force", "--quiet"], cwd=repo, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return repo


def stale(repo: Path, edit) -> set[str]:
    """Stages `dvc status` lists after `edit(repo)` (undone afterwards)."""
    saved = {p: p.read_bytes() for p in [repo / "params.yaml", repo / "osv" / "samplers.py"]}
    try:
        edit(repo)
        out = subprocess.run([BIN / "dvc", "status", "--json"], cwd=repo, env=ENV, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return set(json.loads(out.stdout)) - {"check"}  # the validation gate runs on every params edit
    finally:
        for p, data in saved.items():
            p.write_bytes(data)


def edit_params(change):
    def edit(repo):
        p = yaml.safe_load((repo / "params.yaml").read_text())
        change(p)
        (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    return edit


def test_nothing_stale_after_commit(dvc_repo):
    assert stale(dvc_repo, lambda repo: None) == set()


def test_new_eval_method_reruns_only_its_generate_fvd_and_report(dvc_repo):
    add = lambda p: p["eval"]["methods"].update(osv_3={"model": "stage2", "sampler": "consistency", "steps": 3})  # noqa: E731
    assert stale(dvc_repo, edit_params(add)) == {"generate@osv_3", "fvd@osv_3", "report"}


def test_new_run_reruns_only_that_run(dvc_repo):
    add = lambda p: p["train"]["runs"].update(abl_m2={"stage": "acd", "init": "stage1",  # noqa: E731
                                                       "override": {"acd": {"m": 2}}})
    assert stale(dvc_repo, edit_params(add)) == {"train@abl_m2"}


def test_acd_change_never_reruns_stage1_runs(dvc_repo):
    got = stale(dvc_repo, edit_params(lambda p: p["acd"].update(ema_decay=0.9)))
    acd_runs = {f"train@{r}" for r, v in PARAMS["train"]["runs"].items() if v["stage"] == "acd"}
    assert got == acd_runs | {"claims"}  # the claims miniature trains with the acd settings too


def test_resources_and_eval_settings_rerun_no_training(dvc_repo):
    def change(p):
        p["resources"]["train"] = {"cpus_per_task": 1, "timeout_min": 5, "partition": "gpu"}
        p["eval"]["num_clips"] = 8
    got = stale(dvc_repo, edit_params(change))
    assert got == {f"{s}@{m}" for m in PARAMS["eval"]["methods"] for s in ("generate", "fvd")}


def test_code_edit_reruns_the_stages_that_run_it(dvc_repo):
    def edit(repo):
        with (repo / "osv" / "samplers.py").open("a") as f:
            f.write("\n# an edit\n")
    got = stale(dvc_repo, edit)
    want = {"teacher"} | {f"train@{r}" for r in PARAMS["train"]["runs"]} | \
        {f"generate@{m}" for m in PARAMS["eval"]["methods"]} | {"claims"}
    assert got == want


# ---------------------------------------------------------------- the Snakemake front end


def snakemake(*args) -> subprocess.CompletedProcess:
    return subprocess.run([BIN / "snakemake", "-n", *args], cwd=ROOT, env=ENV, capture_output=True, text=True)


def test_snakemake_refuses_config_overrides(tmp_path):
    """--config/--configfile would record params the osv commands never read (they read params.yaml)."""
    out = snakemake("--config", "seed=5")
    assert out.returncode != 0 and "edit params.yaml instead" in out.stderr + out.stdout
    other = tmp_path / "other.yaml"
    other.write_text((ROOT / "params.yaml").read_text().replace("seed: 0", "seed: 7"))
    out = snakemake("--configfile", str(other))
    assert out.returncode != 0 and "edit params.yaml instead" in out.stderr + out.stdout
    assert snakemake("--config", "launcher=local").returncode == 0  # what the profiles pass


def test_snakemake_refuses_invalid_params_before_planning(tmp_path):
    """The full gate (cross-key rules too) runs at parse time, so no output can be cleared."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(".venv", ".git", ".snakemake", "data", "models",
                                                               "runs", "samples", "logs", ".dvc"))
    p = (repo / "params.yaml").read_text().replace("cfg: {min: 1.0, max: 3.0,", "cfg: {min: 4.0, max: 3.0,")
    (repo / "params.yaml").write_text(p)
    out = subprocess.run([BIN / "snakemake", "-n"], cwd=repo, env=ENV, capture_output=True, text=True)
    assert out.returncode != 0 and "acd.cfg.min" in out.stderr + out.stdout


def test_dvc_refuses_invalid_params_before_any_stage_clears_outputs(dvc_repo):
    """A cross-key error (CFG min > max) passes the schema; dvc.yaml's check stage refuses it
    before train@stage1 (whose params changed) could remove its outputs."""
    params = dvc_repo / "params.yaml"
    saved = params.read_text()
    try:
        params.write_text(saved.replace("cfg: {min: 1.0, max: 3.0,", "cfg: {min: 4.0, max: 3.0,"))
        out = subprocess.run([BIN / "dvc", "repro"], cwd=dvc_repo, env=ENV, capture_output=True, text=True)
        assert out.returncode != 0 and "acd.cfg.min" in out.stdout + out.stderr
        assert (dvc_repo / "models" / "stage2" / "stand-in").exists()
        assert (dvc_repo / "metrics" / "train" / "stage2.json").exists()
    finally:
        params.write_text(saved)
