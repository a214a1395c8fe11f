"""run_stage on a real one-node SLURM 22.05 (2 CPUs, 2 fake GPUs, sacct): GPU allocation,
remote tracebacks, scancel detection, requeue with resume, a 2-task torch.distributed job."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from polling import poll

from osv import launch
from osv.params import deep_merge, load_params

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slurm


# ------------------------------------------------ job functions (imported by name in the job)

def job_where(tag: str) -> dict:
    return {"tag": tag, "job": os.environ.get("SLURM_JOB_ID"), "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "cwd": os.getcwd(), "where": launch.describe()}


def job_raises(message: str):
    raise ValueError(f"remote failure: {message}")


def job_sleeps(marker: str, seconds: float):
    Path(marker).write_text(os.environ["SLURM_JOB_ID"])
    time.sleep(seconds)
    return "woke up"


def count_steps(ckpt_dir: str, steps: int, step_s: float) -> dict:
    """A deterministic torch 'training' loop that resumes from ckpt_dir/state.safetensors.

    Like the training code, it saves on SIGUSR2 at a step boundary and then hands the signal to
    the previous (submitit's) handler, which requeues the job and exits.
    """
    import torch
    from safetensors.torch import load_file, save_file

    ckpt = Path(ckpt_dir)
    ckpt.mkdir(parents=True, exist_ok=True)
    state_file = ckpt / "state.safetensors"
    previous = signal.getsignal(signal.SIGUSR2)
    preempted = threading.Event()
    signal.signal(signal.SIGUSR2, lambda signum, frame: preempted.set())
    w, start = torch.zeros(8, dtype=torch.float64), 0
    if state_file.exists():
        saved = load_file(str(state_file))
        w, start = saved["w"], int(saved["step"].item())
    with (ckpt / "incarnations.txt").open("a") as f:
        f.write(f"{os.environ.get('SLURM_JOB_ID', 'local')} from {start}\n")

    def save(step: int) -> None:
        tmp = ckpt / "state.tmp.safetensors"
        save_file({"w": w, "step": torch.tensor([step])}, str(tmp))
        os.replace(tmp, state_file)

    try:
        for step in range(start, steps):
            gen = torch.Generator().manual_seed(1000 + step)
            w = 0.9 * w + torch.randn(8, generator=gen, dtype=torch.float64)
            (ckpt / "progress.txt").write_text(str(step + 1))
            if preempted.is_set():
                save(step + 1)
                if callable(previous):
                    previous(signal.SIGUSR2, None)  # submitit: checkpoint(), scontrol requeue, exit
                preempted.clear()
            time.sleep(step_s)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    runs = (ckpt / "incarnations.txt").read_text().splitlines()
    return {"w": w.tolist(), "runs": runs}


def job_all_reduce(value: float) -> dict:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    t = torch.tensor([value * (dist.get_rank() + 1)])
    dist.all_reduce(t)
    out = {"rank": dist.get_rank(), "world": dist.get_world_size(), "sum": float(t.item()),
           "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "job": os.environ.get("SLURM_JOB_ID")}
    dist.destroy_process_group()
    return out


# ------------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def params():
    base = load_params(REPO / "params.yaml")
    small = {"gpus": 1, "cpus_per_task": 1, "mem_gb": 1, "timeout_min": 15, "partition": "gpu"}
    return deep_merge(base, {"resources": {"default": small}})


@pytest.fixture
def on_slurm(slurm_cluster, launch_env, monkeypatch):
    monkeypatch.setenv("OSV_LAUNCHER", "slurm")
    return launch_env


def sacct_field(job_id: str, field: str, want: str = "", wait_s: float = 30) -> str:
    """A job's sacct field, waited for until it holds `want`: accounting lags the job, and when
    slurmdbd hears of a job's first step before the job itself it files the job as "allocation"
    until the job's own start record arrives (seen under CI load)."""
    def read():
        return subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", field], capture_output=True,
                              text=True).stdout.strip()

    return poll(read, lambda out: out and want in out, wait_s)


def in_thread(fn, *args) -> dict:
    """Run fn in a thread; the returned dict fills with result/error and the end time."""
    box: dict = {}

    def target():
        try:
            box["result"] = fn(*args)
        except Exception as exc:  # the test inspects it
            box["error"] = exc
        box["ended"] = time.monotonic()

    box["thread"] = threading.Thread(target=target, daemon=True)
    box["thread"].start()
    return box


def wait_for(predicate, timeout: float, what: str) -> None:
    if not poll(predicate, bool, timeout, 0.2):
        raise AssertionError(f"timed out waiting for {what}")


# ---------------------------------------------------------------------------------- tests

def test_gpu_job_runs_as_its_own_job(on_slurm, params, capsys):
    out = launch.run_stage("encode", job_where, {"tag": "slurm"}, params)
    assert out["tag"] == "slurm" and out["job"], out
    assert out["cuda"] in {"0", "1"}, f"SLURM should set CUDA_VISIBLE_DEVICES inside the job: {out}"
    assert os.path.samefile(out["cwd"], on_slurm)
    assert f"slurm_job={out['job']}" in out["where"]
    assert "gres/gpu=1" in sacct_field(out["job"], "AllocTRES", "gres/gpu=1")
    assert sacct_field(out["job"], "JobName", "osv-encode") == "osv-encode"
    assert f"submitted slurm job {out['job']}" in capsys.readouterr().out


def test_remote_exception_fails_with_traceback(on_slurm, params):
    with pytest.raises(launch.LaunchError) as err:
        launch.run_stage("encode", job_raises, {"message": "on slurm"}, params)
    text = str(err.value)
    assert "remote failure: on slurm" in text and "Traceback" in text and "job_raises" in text
    assert "slurm job " in text and "_log.err" in text


def test_scancel_fails_within_a_minute(on_slurm, params, capsys):
    marker = on_slurm / "started.txt"
    box = in_thread(launch.run_stage, "encode", job_sleeps, {"marker": str(marker), "seconds": 600}, params)
    wait_for(marker.exists, 120, "the sleeping job to start")
    job_id = marker.read_text()
    cancelled = time.monotonic()
    subprocess.run(["scancel", job_id], check=True)
    box["thread"].join(90)
    assert not box["thread"].is_alive(), "run_stage still waiting 90 s after scancel"
    latency = box["ended"] - cancelled
    with capsys.disabled():
        print(f"\n[scancel detection latency: {latency:.1f} s]")
    assert isinstance(box.get("error"), launch.LaunchError), box
    assert "CANCELLED" in str(box["error"]) and job_id in str(box["error"])
    assert latency < 60


def test_requeue_resumes_to_the_same_result(on_slurm, params):
    import submitit

    steps = 12
    reference = count_steps(str(on_slurm / "reference"), steps, 0.0)  # uninterrupted, in-process
    ckpt = on_slurm / "ckpt"
    box = in_thread(lambda: launch.run_stage("train", count_steps,
                                             {"ckpt_dir": str(ckpt), "steps": steps, "step_s": 1.0},
                                             params, checkpointable=True))
    progress = ckpt / "progress.txt"
    wait_for(lambda: progress.exists() and int(progress.read_text() or 0) >= 3, 120, "3 steps")
    job_id = (ckpt / "incarnations.txt").read_text().split()[0]
    folder = next((on_slurm / "logs" / "train").iterdir())
    submitit.SlurmJob(folder=folder, job_id=job_id)._interrupt()  # preemption: SIGTERM, then USR2
    box["thread"].join(240)
    assert not box["thread"].is_alive(), "requeued job did not finish"
    assert "error" not in box, box.get("error")
    out = box["result"]
    assert len(out["runs"]) == 2 and out["runs"][1] != f"{job_id} from 0", out["runs"]
    assert out["w"] == reference["w"]  # bit-identical float64 state after resume
    assert sacct_field(job_id, "State", "COMPLETED") == "COMPLETED"


def test_two_tasks_on_two_gpus_all_reduce(on_slurm, params):
    two = deep_merge(params, {"resources": {"train": {"tasks_per_node": 2, "gpus": 2}}})
    out = launch.run_stage("train", job_all_reduce, {"value": 1.0}, two)
    assert out["rank"] == 0 and out["world"] == 2 and out["sum"] == 3.0, out
    assert out["cuda"] == "0"  # rank 0 keeps the first of the job's two GPUs
    assert "gres/gpu=2" in sacct_field(out["job"], "AllocTRES", "gres/gpu=2")


@pytest.mark.parametrize("preempt", ["scancel --signal=TERM", "scontrol requeue"])
def test_preempted_training_run_requeues_and_resumes_bit_exactly(on_slurm, params, preempt, monkeypatch):
    """The real train_run on SLURM, preempted by SIGTERM (or requeued by an admin) mid-run: it
    checkpoints, is requeued, resumes, and exports the weights of an uninterrupted run."""
    from safetensors.torch import load_file
    from test_train import make_workspace, run_params, tiny_params

    from osv.train.checkpoint import list_checkpoints
    from osv.train.distill import train_run

    p = tiny_params({"lgp": {"steps": 40}, "train": {"checkpoint_every": 2},
                     "resources": {"default": params["resources"]["default"]}})
    ws = make_workspace(on_slurm, p)

    def kwargs_in(root):
        return dict(params=run_params(p, "stage1"), run="stage1", teacher=str(ws["teacher"]), init=str(ws["teacher"]),
                    latents=str(ws["latents"]), ckpt=str(root / "runs" / "stage1"), out=str(root / "models" / "stage1"),
                    metrics=str(root / "metrics" / "stage1.json"), plots=str(root / "plots" / "stage1.csv"))

    monkeypatch.setenv("OSV_LAUNCHER", "none")  # uninterrupted, in-process, the job's thread count
    reference = kwargs_in(on_slurm / "reference")
    launch.run_stage("train", train_run, reference, reference["params"], checkpointable=True)
    want = load_file(str(on_slurm / "reference" / "models" / "stage1" / "student.safetensors"))

    monkeypatch.setenv("OSV_LAUNCHER", "slurm")
    kwargs = kwargs_in(on_slurm)
    box = in_thread(lambda: launch.run_stage("train", train_run, kwargs, kwargs["params"], checkpointable=True))
    wait_for(lambda: len(list_checkpoints(on_slurm / "runs" / "stage1")) >= 1, 180, "a first checkpoint")
    job_id = subprocess.run(["squeue", "-h", "-o", "%i", "-n", "osv-train-stage1"], capture_output=True,
                            text=True).stdout.split()[0]
    subprocess.run([*preempt.split(), job_id], check=True)
    box["thread"].join(300)
    assert not box["thread"].is_alive(), "the preempted job did not finish"
    assert "error" not in box, box.get("error")
    logs = "".join(p.read_text(errors="replace") for p in (on_slurm / "logs").rglob("*_log.*"))
    assert "signal received, checkpoint at step" in logs, logs[-3000:]
    got = load_file(str(on_slurm / "models" / "stage1" / "student.safetensors"))
    assert got.keys() == want.keys() and all(torch_equal(got[k], want[k]) for k in want)
    assert sacct_field(job_id, "State", "COMPLETED") == "COMPLETED"


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


SUBMITTER = """
import sys
from osv import launch
from osv.params import deep_merge, load_params
from test_slurm import job_sleeps
params = deep_merge(load_params(sys.argv[1]), {"resources": {"default": {"gpus": 1, "cpus_per_task": 1,
                    "mem_gb": 1, "timeout_min": 15, "partition": "gpu"}}})
print(launch.run_stage("encode", job_sleeps, {"marker": sys.argv[2], "seconds": float(sys.argv[3])}, params))
"""


def test_killed_submitter_reattaches_instead_of_submitting_again(on_slurm, params, capsys):
    """The submitting process dies (SIGKILL: a killed Snakemake, a dead login node) while its job
    runs; the rerun waits for that job and gets its result, and no second job is submitted."""
    import sys

    marker = on_slurm / "started.txt"
    args = [sys.executable, "-c", SUBMITTER, str(REPO / "params.yaml"), str(marker), "20"]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=os.environ.copy())
    wait_for(marker.exists, 120, "the job to start")
    first.kill()
    first.wait(10)
    job_id = marker.read_text()
    assert launch.scheduler_state(job_id) in launch.ACTIVE_STATES  # the job outlived its submitter
    out = launch.run_stage("encode", job_sleeps, {"marker": str(marker), "seconds": 20.0}, params)
    assert out == "woke up"
    assert f"reattached to slurm job {job_id}" in capsys.readouterr().out
    jobs = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,WorkDir"], capture_output=True, text=True).stdout
    assert [j.split("|")[0] for j in jobs.splitlines() if j.endswith(str(on_slurm))] == [job_id]
    assert not list((on_slurm / "logs" / "encode").glob("job-*.json")), "the record outlived its call"
