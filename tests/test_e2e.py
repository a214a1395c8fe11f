"""End to end, as a user would: the whole embedded DAG (with smaller step counts) through
`snakemake --profile slurm` on the real one-node SLURM, and through `dvc repro` with
versioning across commits, a remote and a fresh clone."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from polling import poll

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def smoke_params(every_run: bool = False) -> dict:
    """params.yaml with every stage of the DAG but tiny sizes and step counts; unless every_run,
    only the runs and methods of the full OSV (the ablations are the same stages with other
    params; test_snakemake_local_runs_every_run_and_method runs them all)."""
    p = copy.deepcopy(yaml.safe_load((ROOT / "params.yaml").read_text()))
    if not every_run:
        p["train"]["runs"] = {k: v for k, v in p["train"]["runs"].items() if k in ("stage1", "stage2")}
        p["eval"]["methods"] = {k: v for k, v in p["eval"]["methods"].items()
                                if k in ("teacher_2", "osv_1", "osv_tts")}
    p["data"].update(frames=4, resolution={"width": 64, "height": 32}, low_resolution={"width": 32, "height": 16})
    p["data"]["embedded"].update(max_train_clips=6, max_test_clips=4, stills=False)
    p["vae"]["steps"] = 5
    p["vae"]["finetune"].update(steps=2, batch_size=2)
    p["teacher"]["steps"] = 6
    p["lgp"]["steps"] = 3
    p["acd"]["steps"] = 4
    p["acd"]["resolution_schedule"] = [{"from_step": 0, "resolution": "low"}, {"from_step": 2, "resolution": "high"}]
    p["train"]["checkpoint_every"] = 2
    p["eval"].update(num_clips=4, batch_size=4)
    p["encode"].update(batch_size=4, shard_size=4)
    p["claims"].update(seeds=2, batch_size=16, stage1_steps=5, stage2_steps=20, eval_points=64, eval_every=10,
                       reference_steps=50)
    for res in p["resources"].values():
        res.update(mem_gb=2, cpus_per_task=1)
    return p


def scratch_repo(path: Path, params: dict) -> Path:
    """A git repository holding the project's tracked files (as a clone would) and these params."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, path / name)
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "scratch"]):
        sh(cmd, path)
    return path


def sh(cmd, cwd: Path, env: dict | None = None, timeout: int = 1500) -> str:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", **(env or {})}
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({out.returncode}):\n{out.stdout[-6000:]}\n"
                             f"{out.stderr[-6000:]}")
    return out.stdout + out.stderr


def expected_outputs(params: dict) -> list[str]:
    runs, methods = params["train"]["runs"], params["eval"]["methods"]
    return (["data/clips/manifest.csv", "models/base/model_index.json", "models/vae", "data/latents",
             "models/teacher/unet", "reports/results.md", "reports/fvd_vs_nfe.png", "plots/fvd_vs_nfe.csv"]
            + [f"models/{r}/unet" for r in runs] + [f"metrics/train/{r}.json" for r in runs]
            + [f"samples/{m}/preview.gif" for m in methods] + [f"metrics/eval/{m}.json" for m in methods])


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_snakemake_profile_slurm_runs_the_dag(tmp_path, slurm_cluster):
    """The DAG on SLURM, with its submit host dying while a training job runs (SIGKILL to Snakemake
    and every process it started, as a lost login node does): after `snakemake --unlock` the rerun
    reattaches to the jobs, no checkpoint is lost, and no stage instance ever ran as two SLURM jobs
    at once (from sacct below)."""
    params = smoke_params()
    params["lgp"]["steps"] = 150  # long enough to be caught running and still run at the rerun (~30 s)
    repo = scratch_repo(tmp_path / "repo", params)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # Snakemake's own resource flags reach the SLURM jobs (params.yaml asks 2 GB for every stage here)
    snakemake = ["snakemake", "--profile", "slurm", "--set-resources", "train:mem_mb=1536"]
    first = subprocess.Popen(snakemake, cwd=repo, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)

    def train_running():
        out = sh(["squeue", "-h", "-o", "%j|%T|%Z"], repo).splitlines()
        return [j for j in out if j.startswith("osv-train-") and "|RUNNING|" in j and j.endswith(str(repo))]

    try:
        assert poll(train_running, bool, 900, 0.5), "no training job ever ran"
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # no cleanup anywhere: the jobs keep running
        first.wait(30)
    runs_before = sorted((repo / "runs").glob("*/checkpoints/step-*"))
    sh(["snakemake", "--unlock"], repo)
    rerun = sh(snakemake, repo)
    assert "reattached to slurm job" in rerun or "reattached to slurm job" in "".join(
        p.read_text() for p in (repo / "logs" / "train").glob("*.log")), rerun[-3000:]
    kept = sorted((repo / "runs").glob("*/checkpoints/step-*"))  # nothing deleted (keep_last prunes old steps)
    assert all(p.parent.parent in {k.parent.parent for k in kept} for p in runs_before), (runs_before, kept)
    assert {k.parent.parent.name for k in kept} == set(params["train"]["runs"])
    missing = [p for p in expected_outputs(params) if not (repo / p).exists()]
    assert not missing, missing

    # Every stage instance ran as a SLURM job named after it, never two of one instance at once: a job
    # still running when the submit host died was reattached; one that completed after Snakemake
    # cleared its outputs (an interrupted rule's) was submitted again, after the first had ended.
    runs, methods = params["train"]["runs"], params["eval"]["methods"]
    expected = ({"osv-data", "osv-vae", "osv-encode-part0", "osv-teacher", "osv-claims"}
                | {f"osv-train-{r}" for r in runs} | {f"osv-generate-{m}-part0" for m in methods}
                | {f"osv-fvd-{m}" for m in methods})

    def our_jobs():
        jobs = sh(["sacct", "-X", "-n", "-P", "-o", "JobID,JobName%60,AllocTRES,State,Start,End,ReqMem,WorkDir"],
                  repo).splitlines()
        return [j.split("|") for j in jobs if j.split("|")[-1].startswith(str(repo))]

    ours = poll(our_jobs, lambda o: {j[1] for j in o} >= expected, 30)  # accounting lags by a moment
    assert {j[1] for j in ours} == expected, ours
    assert all(j[3] == "COMPLETED" for j in ours), ours
    for name in expected:
        spans = sorted((j[4], j[5]) for j in ours if j[1] == name)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), (name, spans)
    gpu_jobs = [j for j in ours if not j[1].startswith(("osv-data", "osv-claims"))]
    assert all("gres/gpu=1" in j[2] for j in gpu_jobs), gpu_jobs
    assert {mem_mb(j[6]) for j in ours if j[1].startswith("osv-train-")} == {1536}, ours
    assert {mem_mb(j[6]) for j in ours if not j[1].startswith("osv-train-")} == {2048}, ours
    cpu_only = {"claims.log", "data.log"}  # resources: gpus 0
    logs = "".join(p.read_text() for p in (repo / "logs").rglob("*.log") if p.name not in cpu_only)
    assert "slurm_job=" in logs and "CUDA_VISIBLE_DEVICES=<unset>" not in logs
    assert "CUDA_VISIBLE_DEVICES=0" in logs or "CUDA_VISIBLE_DEVICES=1" in logs

    # A second run has nothing to do.
    again = sh(["snakemake", "--profile", "slurm", "-n"], repo)
    assert "Nothing to be done" in again, again[-2000:]

    # One browsable page with the tables, plots and previews.
    sh(["snakemake", "--report", "report.html"], repo)
    page = (repo / "report.html").read_text()
    assert "preview.gif" in page and "contact.png" in page and "results.md" in page


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_snakemake_local_runs_every_run_and_method(tmp_path):
    """README command 1's DAG with every training ablation and every Table 1/2 row, tiny sizes."""
    params = smoke_params(every_run=True)
    repo = scratch_repo(tmp_path / "repo", params)
    sh(["snakemake", "--profile", "local"], repo)
    missing = [p for p in expected_outputs(params) if not (repo / p).exists()]
    assert not missing, missing
    results = (repo / "reports" / "results.md").read_text()
    assert "not produced" not in results
    for method in params["eval"]["methods"]:
        assert f"`{method}`" in results, method
    report = json.loads((repo / "reports" / "metrics.json").read_text())
    assert set(report["methods"]) == set(params["eval"]["methods"])
    assert all(m["fvd"] >= 0 and m["nfe"] >= 1 for m in report["methods"].values())
    from osv.provenance import read_metrics

    vae_front = read_metrics(repo / "metrics/train/abl_e_vae_disc.json")
    assert vae_front["protocol"]["disc_front_end"] == "vae"

    # Code is a dependency: editing the samplers replans exactly the stages that run them.
    assert "Nothing to be done" in sh(["snakemake", "--profile", "local", "-n"], repo)
    with (repo / "osv" / "samplers.py").open("a") as f:
        f.write("\n# an edit\n")
    plan = sh(["snakemake", "--profile", "local", "-n"], repo)
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", plan.split("Job stats:", 1)[1], flags=re.M))
    assert {k: int(v) for k, v in jobs.items() if k != "total"} == {
        "teacher": 1, "train": len(params["train"]["runs"]), "generate_part": len(params["eval"]["methods"]),
        "generate": len(params["eval"]["methods"]), "fvd": len(params["eval"]["methods"]), "claims": 1, "report": 1,
        "all": 1}, plan[-3000:]  # the claims miniature trains through the package's samplers too


def mem_mb(text: str) -> int:
    """sacct's ReqMem ("2G", "1.50G", "1536M") in MB."""
    number, unit = float(text[:-1]), text[-1].upper()
    return round(number * {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}[unit])


def readme_block(title: str) -> list[str]:
    """The command lines of the README's fenced bash block under `## title` (comments kept as lines)."""
    text = (ROOT / "README.md").read_text().split(f"## {title}\n", 1)[1]
    return text.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()


def tensors(folder: Path) -> dict:
    """Every tensor of every safetensors file below a folder (headers order their metadata
    differently from run to run, so files are compared by content, not bytes)."""
    from safetensors.torch import load_file

    return {f"{p.relative_to(folder)}:{k}": v for p in sorted(folder.rglob("*.safetensors"))
            for k, v in load_file(str(p)).items()}


def numeric_leaves(tree) -> list:
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in numeric_leaves(v)]
    return [tree]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_dvc_versioning_across_commits_and_clones(tmp_path):
    """The README's "Comparing runs across commits" block, run as written (the comment line is
    the edit the test makes), then a fresh clone pulls every output."""
    params = smoke_params()
    repo = scratch_repo(tmp_path / "repo", params)
    # The README's default remote is ~/.cache/osv/dvc-remote; a user's shell has no thread limit
    # (sh() sets OMP_NUM_THREADS=1), so each stage must pin its own threads (resources.*.cpus_per_task).
    home = {"HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "2"}
    block = readme_block("Comparing runs across commits")
    assert block[1].startswith("# change one thing, e.g. acd.m: 5 -> 1"), block
    sh(["bash", "-c", block[0]], repo, env=home)
    params["acd"]["m"] = 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(["bash", "-c", block[2]], repo, env=home)
    shown = {line.split("#")[0].strip(): sh(["bash", "-c", line.split("#")[0]], repo, env=home) for line in block[3:]}
    assert len(shown) == 3 and not any("failed to load" in out for out in shown.values()), shown

    pdiff = json.loads(sh(["dvc", "params", "diff", "HEAD~1", "--json"], repo))
    assert (pdiff["params.yaml"]["acd.m"]["old"], pdiff["params.yaml"]["acd.m"]["new"]) == (5, 1)
    mdiff = json.loads(sh(["dvc", "metrics", "diff", "HEAD~1", "--all", "--json"], repo))
    want = (["metrics/vae.json", "metrics/teacher.json", "reports/metrics.json"]
            + [f"metrics/train/{r}.json" for r in params["train"]["runs"]]
            + [f"metrics/eval/{m}.json" for m in params["eval"]["methods"]])
    assert set(want) <= set(mdiff), sorted(mdiff)
    for f in want:  # both commits' values, for every metric
        assert all(v.get("old") is not None and v.get("new") is not None for v in mdiff[f].values()), (f, mdiff[f])
    assert "psnr_test_db" in mdiff["metrics/vae.json"] and "fvd" in mdiff["metrics/eval/osv_tts.json"]
    changed = {f for f, m in mdiff.items() for k, v in m.items() if v.get("diff")}
    assert "metrics/eval/osv_tts.json" in changed and "metrics/train/stage1.json" not in changed, mdiff
    shown_metrics = json.loads(sh(["dvc", "metrics", "show", "--json"], repo))
    leaves = numeric_leaves(shown_metrics)
    assert leaves and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in leaves
                          if x is not None and not isinstance(x, dict)), "dvc metrics show lists only numbers"
    html = (repo / "dvc_plots" / "index.html").read_text()
    assert "loss_distance" in html and "plots/train/stage2.csv" in html

    # Same params, same numbers, whichever front end: stage 1 again through Snakemake (1 thread
    # per job there) gives DVC's weights bit for bit.
    dvc_weights = tensors(repo / "models" / "stage1")
    dvc_metrics = json.loads((repo / "metrics" / "train" / "stage1.json").read_text())
    shutil.move(repo / "runs" / "stage1", tmp_path / "dvc_stage1_ckpt")
    sh(["snakemake", "--profile", "local", "--forcerun", "train", "--allowed-rules", "train", "--",
        "models/stage1"], repo)
    snake_weights = tensors(repo / "models" / "stage1")
    assert snake_weights.keys() == dvc_weights.keys() and dvc_weights
    assert all(torch.equal(snake_weights[k], dvc_weights[k]) for k in dvc_weights), \
        [k for k in dvc_weights if not torch.equal(snake_weights[k], dvc_weights[k])][:5]
    snake_metrics = json.loads((repo / "metrics" / "train" / "stage1.json").read_text())
    assert snake_metrics["final"] == dvc_metrics["final"]

    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    sh(["dvc", "pull"], clone, env=home)
    for p in expected_outputs(params):
        assert (clone / p).exists(), p
    assert (clone / "runs" / "stage2").is_dir()
    status = sh(["dvc", "status"], clone)
    assert "Data and pipelines are up to date" in status, status
