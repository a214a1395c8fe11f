"""The Snakefile and dvc.yaml describe the same DAG; the workflow is lint-clean."""

import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
LOG_REDIRECT = re.compile(r" (2>&1 \| tee \S+|> \S+ 2>&1)$")
# Snakemake's resources handed to the job (--set-resources); dvc repro submits params.yaml's
RESOURCES = re.compile(r"^OSV_RESOURCES=mem_mb=\d+,runtime=\d+,gpu=\d+ ")
# Snakemake fans these out into one job per part (docs/design.md "Fan-out"); `dvc repro` runs the
# same command without --part (every part, submitted at once), then the gather.
FANOUT = {"data_part": "data", "encode_part": "encode", "generate_part": "generate"}
RECEIPT = re.compile(r"^(data/parts/|data/latents\.parts/|samples\.parts/)")


@functools.cache
def dry_run() -> str:
    return subprocess.run([BIN / "snakemake", "-n", "-p", "--forceall", "--nocolor"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, check=True).stdout


def snakemake_jobs() -> dict:
    """Parse `snakemake -n -p --forceall`: {(rule, wildcard value): (cmd, inputs, outputs)}."""
    jobs = {}
    for block in dry_run().split("\nrule ")[1:]:
        rule = block.split(":", 1)[0]
        fields = dict(re.findall(r"^    (input|output|wildcards): (.*)$", block, flags=re.M))
        cmd = re.search(r"^Shell command: (.*)$", block, flags=re.M)
        if rule == "all":
            continue
        wildcards = dict(w.split("=", 1) for w in filter(None, fields.get("wildcards", "").split(", ")))
        wildcard = ", ".join(v if k != "part" else f"part={v}" for k, v in wildcards.items()) or None
        jobs[(rule, wildcard)] = (
            RESOURCES.sub("", LOG_REDIRECT.sub("", cmd.group(1))),
            set(filter(None, fields.get("input", "").split(", "))),
            set(fields["output"].split(", ")),
        )
    return jobs


def dvc_stages() -> dict:
    from dvc.repo import Repo

    stages = {}
    with Repo(str(ROOT)) as repo:
        for stage in repo.index.stages:
            rule, _, key = stage.addressing.partition("@")
            if rule == "check":  # DVC's validation gate; the Snakefile validates at parse time
                continue
            stages[(rule, key or None)] = (
                stage.cmd,
                {str(d.def_path) for d in stage.deps if not d.def_path.endswith((".yaml", "params-valid"))},
                {str(o.def_path) for o in stage.outs},
            )
    return stages


def covered(path: str, folders: set) -> bool:
    return any(path == f or path.startswith(f.rstrip("/") + "/") for f in folders)


def merged_jobs() -> dict:
    """Snakemake's jobs as DVC's stages: each gather with its parts (the parts' commands are the
    stage's own plus --part; the receipts between them are Snakemake's bookkeeping)."""
    jobs, merged = snakemake_jobs(), {}
    for (rule, wc), (cmd, inputs, outputs) in jobs.items():
        if rule not in FANOUT:
            merged[(rule, wc)] = (cmd.replace(" --gather", ""), {i for i in inputs if not RECEIPT.match(i)}, outputs)
    for (rule, wc), (cmd, inputs, outputs) in jobs.items():
        if rule in FANOUT:
            key = (FANOUT[rule], re.sub(r"(, )?part=\S+", "", wc) or None)
            assert key in merged, f"{rule} {wc}: no gather {key}"
            assert re.sub(r" --part \d+", "", cmd) == merged[key][0], f"{rule} {wc}: {cmd} vs {merged[key][0]}"
            assert all(RECEIPT.match(o) for o in outputs), (rule, outputs)
            merged[key][1].update(inputs)
    return merged


def test_snakefile_and_dvc_yaml_hold_the_same_dag():
    snake, dvc = merged_jobs(), dvc_stages()
    assert set(snake) == set(dvc), f"only Snakemake: {set(snake) - set(dvc)}; only DVC: {set(dvc) - set(snake)}"
    for name, (cmd, inputs, outputs) in snake.items():
        dcmd, ddeps, douts = dvc[name]
        assert cmd == dcmd, f"{name}: commands differ\n snakemake: {cmd}\n dvc:       {dcmd}"
        # Resumable state is DVC's only (versioned, persist: true): Snakemake would delete it on a
        # failure, so it declares a checkpoint folder not at all and the latent folder by its index.
        resumable = {o for o in douts if o.startswith("runs/")}
        assert all(covered(o, douts) for o in outputs), f"{name}: outputs {outputs} vs {douts}"
        assert all(any(covered(o, {d}) for o in outputs) for d in douts - resumable), f"{name}: {outputs} vs {douts}"
        # DVC may depend on a folder that holds several Snakemake inputs (the report stage).
        assert all(covered(i, ddeps) for i in inputs), f"{name}: inputs {inputs} not in dvc deps {ddeps}"
        assert all(any(covered(i, {d}) for i in inputs) for d in ddeps), f"{name}: dvc deps {ddeps} vs {inputs}"


def test_snakemake_lint_is_clean():
    out = subprocess.run([BIN / "snakemake", "--lint"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert "Congratulations" in out.stdout + out.stderr, out.stdout + out.stderr


def test_training_runs_start_longest_chain_first():
    """Ablation e (VAE-decoder discriminator, ~8x the step cost) heads the longest chain of runs."""
    prio = dict(re.findall(r"^rule train:\n(?:    .*\n)*?    wildcards: run=(\S+)\n    priority: (\d+)$", dry_run(),
                           flags=re.M))
    runs = yaml.safe_load((ROOT / "params.yaml").read_text())["train"]["runs"]
    assert set(prio) == set(runs), prio
    assert max(prio, key=lambda r: int(prio[r])) == "abl_e_stage1_vae", prio
    for name, run in runs.items():
        if run["init"] in runs:
            assert int(prio[run["init"]]) > int(prio[name]), (run["init"], name, prio)


def test_resumable_state_is_never_a_snakemake_output_and_persists_in_dvc():
    """Snakemake removes a failed job's outputs and clears an incomplete job's outputs before a
    rerun; DVC removes outputs before rerunning a stage unless persist: true."""
    snake = snakemake_jobs()
    for (rule, _), (_, _, outputs) in snake.items():
        assert not any(o.startswith("runs/") for o in outputs), (rule, outputs)
        assert "data/latents" not in outputs, (rule, outputs)
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert {"data/latents": {"persist": True}} in dvc["encode"]["outs"]
    assert any(o == {"runs/${key}": {"persist": True}} for o in dvc["train"]["do"]["outs"])


def test_paper_scale_plans_data_encoding_and_generation_as_many_jobs(tmp_path):
    """`snakemake -n --profile slurm` with workflow/scales/paper.yaml: one job per OpenVid part, per
    range of encode shards and per range of test clips of every method, each with its gather."""
    for name in ("Snakefile", "workflow", "osv", "slurm"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    shutil.copy(ROOT / "workflow/scales/paper.yaml", tmp_path / "params.yaml")
    out = subprocess.run([BIN / "snakemake", "-n", "--profile", "slurm", "--nocolor"], cwd=tmp_path, env=ENV,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    jobs = {k: int(v) for k, v in re.findall(r"^(\w+)\s+(\d+)$", out.stdout.split("Job stats:", 1)[1], flags=re.M)}
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    res = params["resources"]
    methods = len(params["eval"]["methods"])
    assert jobs["data_part"] == len(params["data"]["openvid"]["parts"]) == 12
    assert jobs["encode_part"] == res["encode"]["jobs"] == 64 and jobs["encode"] == 1
    assert jobs["generate_part"] == methods * res["generate"]["jobs"] == 21 * 8 and jobs["generate"] == methods
