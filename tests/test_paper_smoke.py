"""The paper's architecture through the whole DAG on the real one-node SLURM.

workflow/scales/paper-smoke.yaml: SVD img2vid's UNet, VAE and CLIP image encoder and DINOv2-small
built from their real configs with random weights (nothing downloaded), the paper's training
recipe (LoRA rank 64, temporal layers unfrozen in stage 2) at tiny frame counts, sizes and step counts.
A smoke test that every stage runs at the paper's shapes through `snakemake --profile slurm`;
its numbers mean nothing and its report says so.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from polling import poll
from test_e2e import expected_outputs, scratch_repo, sh

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "workflow" / "scales" / "paper-smoke.yaml"


@pytest.mark.slow
@pytest.mark.timeout(3000)
def test_paper_smoke_dag_runs_through_slurm(tmp_path, slurm_cluster):
    from osv.models import SVD_UNET_PUBLISHED

    params = yaml.safe_load(SMOKE.read_text())
    repo = scratch_repo(tmp_path / "repo", params)
    try:
        sh(["snakemake", "--profile", "slurm"], repo, timeout=2700)
        missing = [p for p in expected_outputs(params) if not (repo / p).exists()]
        assert not missing, missing
        results = (repo / "reports" / "results.md").read_text()
        assert "not produced" not in results

        # The paper's architecture, randomly initialised, and said so wherever a result is.
        weights = json.loads((repo / "models" / "base" / "weights.json").read_text())
        assert weights["architecture"] == "svd" and "random init" in json.dumps(weights)
        for run in params["train"]["runs"]:
            unet = json.loads((repo / "models" / run / "unet" / "config.json").read_text())
            assert {k: unet[k] for k in SVD_UNET_PUBLISHED} == SVD_UNET_PUBLISHED, run
        meta = json.loads((repo / "samples" / "osv_1" / "meta.json").read_text())
        assert "random" in meta["weights"].lower() and meta["resolution"] == [64, 64]

        # Every stage's work ran as a SLURM job, each named after its instance.
        def our_jobs():
            out = sh(["sacct", "-X", "-n", "-P", "-o", "JobName%60,State,WorkDir"], repo).splitlines()
            return [j.split("|") for j in out if j.split("|")[-1].startswith(str(repo))]

        want = ({"osv-data", "osv-vae", "osv-encode-part0", "osv-teacher", "osv-claims"}
                | {f"osv-train-{r}" for r in params["train"]["runs"]}
                | {f"osv-generate-{m}-part0" for m in params["eval"]["methods"]}
                | {f"osv-fvd-{m}" for m in params["eval"]["methods"]})
        jobs = poll(our_jobs, lambda o: {j[0] for j in o} >= want, 30)
        assert {j[0] for j in jobs} == want and all(j[1] == "COMPLETED" for j in jobs), jobs
    finally:
        shutil.rmtree(repo, ignore_errors=True)  # tens of GB of random weights and checkpoints
