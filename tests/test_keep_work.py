"""No rerun deletes resumable work: a failed encode job (on the one-node SLURM) keeps its shards
and a failed training run its checkpoints, through Snakemake and through `dvc repro`, and the
rerun picks them up; the partial report says which rows are missing and why."""

from __future__ import annotations

import re
import shutil

import pytest
from test_e2e import scratch_repo, smoke_params

from osv.numerics import INJECT_ENV


def run(cmd, repo, env=None, ok=True):
    import os
    import subprocess
    import sys
    from pathlib import Path

    bin_dir = Path(sys.executable).parent
    full = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            **(env or {})}
    out = subprocess.run(cmd, cwd=repo, env=full, capture_output=True, text=True, timeout=1200)
    text = out.stdout + out.stderr
    assert (out.returncode == 0) == ok, f"{' '.join(cmd)} rc {out.returncode}:\n{text[-4000:]}"
    return text


def shards(repo):
    return sorted(p.relative_to(repo) for p in (repo / "data" / "latents").rglob("shard-*.safetensors"))


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_failed_jobs_keep_shards_and_checkpoints_in_both_front_ends(tmp_path, slurm_cluster):
    params = smoke_params()
    params["train"]["checkpoint_every"] = 1
    repo = scratch_repo(tmp_path / "repo", params)
    fail = {INJECT_ENV: "encode:1"}  # the first group's second batch: its first shard is written

    # Snakemake: the encode job on SLURM fails once; it leaves its shards (the rule declares only
    # index.json), and the rerun reuses them.
    run(["snakemake", "--profile", "slurm", "data/latents/index.json"], repo, fail, ok=False)
    kept = shards(repo)
    assert kept and not (repo / "data/latents/index.json").exists()
    log = run(["snakemake", "--profile", "slurm", "data/latents/index.json"], repo)
    assert int(re.search(r"'skipped': (\d+)", log).group(1)) >= len(kept), log[-2000:]

    # A training job that fails at step 3 keeps its checkpoints; the rerun resumes from them.
    run(["snakemake", "--profile", "local", "models/stage1"], repo, {INJECT_ENV: "train:2"}, ok=False)
    ckpts = sorted(p.name for p in (repo / "runs/stage1/checkpoints").iterdir())
    assert ckpts and ckpts[-1] == "step-0000002", ckpts
    # The partial report (Snakefile onerror) says which rows are missing and why.
    partial = (repo / "reports" / "results.md").read_text()
    assert "`osv_tts`: not produced (metrics/eval/osv_tts.json missing; logs/train/stage1.log: osv train" in partial
    log = run(["snakemake", "--profile", "local", "models/stage1"], repo)
    assert "resumed from" in log and "(step 2)" in log, log[-2000:]

    # DVC: the same failure and rerun through `dvc repro` (data/latents is persist: true).
    shutil.rmtree(repo / "data" / "latents")
    run(["dvc", "repro", "encode"], repo, fail, ok=False)
    kept = shards(repo)
    assert kept and not (repo / "data/latents/index.json").exists()
    log = run(["dvc", "repro", "encode"], repo)
    assert int(re.search(r"'skipped': (\d+)", log).group(1)) >= len(kept), log[-2000:]
