"""osv.launch without SLURM: modes none/debug/local, resources -> sbatch flags, log streaming."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from osv import launch
from osv.params import deep_merge, load_params, resources_for

REPO = Path(__file__).resolve().parent.parent


def job_info(tag: str) -> dict:
    """Where the call ran (module level: jobs import this module by name)."""
    print(f"hello from {tag}", flush=True)
    return {"pid": os.getpid(), "tag": tag, "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "launcher": os.environ.get("OSV_LAUNCHER"), "cwd": os.getcwd()}


def job_raises(message: str):
    raise ValueError(f"remote failure: {message}")


def job_dies(code: int):
    os._exit(code)


def job_all_reduce(value: float) -> dict:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    t = torch.tensor([value * (dist.get_rank() + 1)])
    dist.all_reduce(t)
    out = {"rank": dist.get_rank(), "world": dist.get_world_size(), "sum": float(t.item()),
           "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}
    dist.destroy_process_group()
    return out


@pytest.fixture(scope="module")
def base_params():
    return load_params(REPO / "params.yaml")


def with_resources(params: dict, stage: str, **res) -> dict:
    return deep_merge(params, {"resources": {stage: res}})


def test_none_runs_in_process(base_params, monkeypatch):
    monkeypatch.delenv("OSV_LAUNCHER", raising=False)
    out = launch.run_stage("encode", job_info, {"tag": "none"}, base_params)
    assert out["pid"] == os.getpid() and out["tag"] == "none"


def test_unknown_mode_is_refused(base_params, monkeypatch):
    monkeypatch.setenv("OSV_LAUNCHER", "kubernetes")
    with pytest.raises(launch.LaunchError, match="OSV_LAUNCHER='kubernetes'"):
        launch.run_stage("encode", job_info, {"tag": "x"}, base_params)


def test_debug_mode(base_params, launch_env, monkeypatch):
    monkeypatch.setenv("OSV_LAUNCHER", "debug")
    out = launch.run_stage("encode", job_info, {"tag": "debug"}, base_params)
    assert out["tag"] == "debug" and out["launcher"] == "none"  # nested run_stage stays in-process
    with pytest.raises(launch.LaunchError, match="remote failure: dbg"):
        launch.run_stage("encode", job_raises, {"message": "dbg"}, base_params)
    assert list((launch_env / "logs" / "encode").iterdir()), "submitit folder under OSV_SUBMITIT_LOGS"


def test_local_mode_subprocess_streams_logs(base_params, launch_env, monkeypatch, capsys):
    monkeypatch.setenv("OSV_LAUNCHER", "local")
    out = launch.run_stage("encode", job_info, {"tag": "local"}, base_params)
    assert out["pid"] != os.getpid() and out["tag"] == "local"
    assert out["cuda"] == "0"  # resources.default.gpus = 1
    assert os.path.samefile(out["cwd"], launch_env)
    printed = capsys.readouterr().out
    assert "hello from local" in printed and "[encode " in printed


def test_local_mode_failure_has_remote_traceback(base_params, launch_env, monkeypatch):
    monkeypatch.setenv("OSV_LAUNCHER", "local")
    with pytest.raises(launch.LaunchError) as err:
        launch.run_stage("encode", job_raises, {"message": "loc"}, base_params)
    text = str(err.value)
    assert "remote failure: loc" in text and "Traceback" in text and "job_raises" in text
    assert "logs:" in text and "_log.err" in text


def test_local_mode_dead_job_does_not_hang(base_params, launch_env, monkeypatch):
    from submitit.core.core import Job

    monkeypatch.setenv("OSV_LAUNCHER", "local")
    monkeypatch.setattr(Job, "_results_timeout_s", 1)  # submitit's wait for a slow file system
    with pytest.raises(launch.LaunchError, match="has not produced any output"):
        launch.run_stage("encode", job_dies, {"code": 3}, base_params)


def test_local_two_tasks_distributed(base_params, launch_env, monkeypatch):
    monkeypatch.setenv("OSV_LAUNCHER", "local")
    params = with_resources(base_params, "train", tasks_per_node=2, gpus=2)
    out = launch.run_stage("train", job_all_reduce, {"value": 1.0}, params)
    assert out["rank"] == 0 and out["world"] == 2 and out["sum"] == 3.0
    assert out["cuda"] == "0"  # each task keeps the GPU of its local rank


def test_resources_become_sbatch_flags(base_params, launch_env):
    params = with_resources(base_params, "teacher", partition="gpu-long", account="proj42", qos="high",
                            constraint="a100", gpus=4, tasks_per_node=4, cpus_per_task=8, mem_gb=64,
                            timeout_min=720, sbatch_extra={"exclusive": True})
    res = resources_for(params, "teacher")
    executor = launch.make_executor("teacher", "slurm", res, launch_env / "logs")
    text = executor._executor._make_submission_file_text("python -m x", "uid")
    for flag in ("--partition=gpu-long", "--account=proj42", "--qos=high", "--constraint=a100",
                 "--gpus-per-node=4", "--ntasks-per-node=4", "--cpus-per-task=8", "--mem=64GB",
                 "--time=720", "--job-name=osv-teacher", "--exclusive", f"--chdir={launch_env}"):
        assert f"#SBATCH {flag}" in text, (flag, text)
    bare = launch.executor_parameters("encode", resources_for(base_params, "encode"))
    assert "slurm_partition" not in bare and "slurm_account" not in bare  # null: cluster default


def test_log_tail_prints_complete_lines(tmp_path, capsys):
    log = tmp_path / "job.out"
    log.write_text("a\nprogress 1%\rprogress 50%\rprogress 100%\npart")
    tail = launch.LogTail([log, tmp_path / "missing.err"], prefix="> ")
    tail.pump()
    with log.open("a") as f:
        f.write("ial\n")
    tail.pump()
    assert capsys.readouterr().out.splitlines() == ["> a", "> progress 100%", "> partial"]


def test_describe_names_host_and_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    line = launch.describe()
    assert "host=" in line and "CUDA_VISIBLE_DEVICES=1" in line


@pytest.mark.parametrize(("profile", "want"), [("slurm", "slurm"), ("local", "none")])
def test_profiles_set_the_launcher(tmp_path, profile, want):
    """The profile's config `launcher` reaches the rules' commands as OSV_LAUNCHER."""
    import subprocess
    import sys

    (tmp_path / "Snakefile").write_text(
        "import os\n"
        "os.environ['OSV_LAUNCHER'] = str(config.pop('launcher', os.environ.get('OSV_LAUNCHER', 'none')))\n"
        "rule all:\n"
        "    output: 'launcher.txt'\n"
        "    shell: 'echo $OSV_LAUNCHER > {output}'\n")
    env = {k: v for k, v in os.environ.items() if k != "OSV_LAUNCHER"}
    snakemake = Path(sys.executable).parent / "snakemake"
    run = subprocess.run([str(snakemake), "--profile", str(REPO / profile), "--cores", "1", "-q"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "launcher.txt").read_text().strip() == want


def _threads() -> tuple[int, str]:
    import torch

    return torch.get_num_threads(), os.environ["OMP_NUM_THREADS"]


def test_job_uses_its_allocated_cpus(monkeypatch):
    """Inside a SLURM job the stage runs on cpus_per_task threads, not the submitter's OMP_NUM_THREADS."""
    import torch

    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    monkeypatch.setenv(launch.ENV_MODE, "slurm")
    try:
        assert launch.StageCall("t", _threads, {})() == (3, "3")
    finally:
        torch.set_num_threads(before)
