"""The one launcher of every GPU stage: in-process, or a submitit job (debug, local, slurm).

`run_stage(stage, fn, kwargs, params)` runs `fn(**kwargs)` where the environment
variable OSV_LAUNCHER says (never params: the launcher does not change results):

- `none` (default): in this process;
- `debug`: submitit's DebugExecutor (in this process, through pickling and the job
  environment; pdb post-mortem only when stdin is a terminal);
- `local`: a submitit subprocess on this machine (tasks_per_node processes);
- `slurm`: one SLURM job with `osv.params.resources_for(params, stage)`.

The caller waits for the job and gets the rank-0 result; the job's stdout/stderr
are streamed to our stdout as they grow. Failures raise `LaunchError` (job id, log
paths, remote traceback). The wait never hangs: the scheduler state is polled, and
a job in a terminal state without a result file fails the call within a minute.
Logs: logs/submitit/<stage>/<time>-<pid>/ (job ids restart on a fresh cluster).

Preemption and timeout (slurm): with `checkpointable=True` (or when `fn` has a
`checkpoint` attribute) submitit's USR2 handler requeues the same call; `fn`
resumes from its own checkpoint folder. A function that installs its own SIGUSR2
handler must call the previous handler (`signal.getsignal(SIGUSR2)`) after saving,
or the job is not requeued.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from submitit.helpers import Checkpointable, DelayedSubmission  # light: no torch

MODES = ("none", "debug", "local", "slurm")
ENV_MODE = "OSV_LAUNCHER"
ENV_LOG_ROOT = "OSV_SUBMITIT_LOGS"
ENV_RESOURCES = "OSV_RESOURCES"  # mem_mb=...,runtime=...,gpu=...: what the Snakemake rule asked for
DEFAULT_LOG_ROOT = "logs/submitit"
# Once the scheduler says the job ended, wait this long for a (slow file system's)
# result file, then fail: a scancelled or OOM-killed job never writes one.
RESULT_GRACE_S = 30.0
# sacct/squeue while waiting: after 2, 4, 8... s, then once a minute. A finished job is seen by its
# result file (checked every LOG_POLL_S, no scheduler call); the scheduler is asked only to catch a
# job that died without one. submitit's own watcher backs off the same way (to 10 min, batched per
# process; here each waiting process watches one job, so a cap of a minute bounds a dead job's wait).
STATE_POLL_S = 2.0
STATE_POLL_MAX_S = 60.0
LOG_POLL_S = 1.0
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED",
                 "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD"}


class LaunchError(RuntimeError):
    """A stage job failed or vanished; the message names the job, its logs and the remote error."""


def launcher_mode() -> str:
    mode = os.environ.get(ENV_MODE, "none").strip().lower() or "none"
    if mode not in MODES:
        raise LaunchError(f"{ENV_MODE}={mode!r} is not a launcher (use one of {', '.join(MODES)})")
    return mode


def describe() -> str:
    """One line saying where this process runs (host, launcher, SLURM job/task, visible GPUs)."""
    env = os.environ
    parts = [f"host={socket.gethostname()}", f"launcher={env.get(ENV_MODE, 'none')}", f"pid={os.getpid()}"]
    if "SLURM_JOB_ID" in env:
        parts += [f"slurm_job={env['SLURM_JOB_ID']}", f"partition={env.get('SLURM_JOB_PARTITION', '?')}",
                  f"nodes={env.get('SLURM_JOB_NODELIST', '?')}"]
    if "SLURM_PROCID" in env or "SUBMITIT_LOCAL_GLOBALID" in env:
        rank = env.get("SLURM_PROCID", env.get("SUBMITIT_LOCAL_GLOBALID"))
        parts.append(f"task={rank}/{env.get('SLURM_NTASKS', env.get('SUBMITIT_LOCAL_NTASKS', '1'))}")
    parts.append(f"CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '<unset>')}")
    if "torch" in sys.modules:  # never import torch just to log
        torch = sys.modules["torch"]
        parts.append(f"cuda_devices={torch.cuda.device_count() if torch.cuda.is_available() else 0}")
    return " ".join(parts)


# ----------------------------------------------------------------- inside the job

class StageCall:
    """The picklable call a job runs: distributed env for multi-task jobs, then fn(**kwargs)."""

    def __init__(self, stage: str, fn: Callable, kwargs: dict, tasks: int = 1):
        self.stage, self.fn, self.kwargs, self.tasks = stage, fn, dict(kwargs), tasks

    def __call__(self):
        from osv import logs, timing

        timing.mark_work_start()  # the job's own start-up ends here: its interpreter, unpickling, imports
        logs.setup()
        if self.tasks > 1:
            export_distributed_env()
        _use_allocated_cpus()
        print(f"[osv {self.stage}] {describe()}", flush=True)
        # A stage function that calls run_stage itself must not submit again from the job.
        os.environ[ENV_MODE] = "none"
        result = self.fn(**self.kwargs)
        timing.finish(self.stage, self.kwargs.get("out"), self.kwargs.get("method_name"))
        return result


def pin_threads(params: dict, stage: str) -> int:
    """CPU threads = resources.<stage>.cpus_per_task wherever the stage runs (in-process, Snakemake
    job, `dvc repro`, SLURM job): the thread count changes float reduction order, so it is pinned
    for the two front ends to give the same numbers. The Snakemake rules ask for the same threads."""
    from osv.params import resources_for

    n = resources_for(params, stage)["cpus_per_task"]
    _set_threads(n)
    return n


def _set_threads(n: int) -> None:
    import torch

    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)


def _use_allocated_cpus() -> None:
    """CPU threads = the job's cpus_per_task: sbatch exports the submitting environment,
    whose OMP_NUM_THREADS (Snakemake sets it to the rule's threads, 1) is not this job's."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus:
        _set_threads(int(cpus))


class CheckpointableStageCall(StageCall, Checkpointable):
    """Requeued on preemption/timeout as the same call (fn resumes from its checkpoints)."""

    def checkpoint(self, *args, **kwargs) -> DelayedSubmission:
        own = getattr(self.fn, "checkpoint", None)
        if callable(own):  # fn curates its own resubmission
            delayed = own(**self.kwargs)
            if delayed is not None:
                fn = functools.partial(delayed.function, *delayed.args) if delayed.args else delayed.function
                return DelayedSubmission(type(self)(self.stage, fn, delayed.kwargs, self.tasks))
        return DelayedSubmission(self)


def export_distributed_env() -> None:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT for init_process_group(env://).

    Each task keeps the one GPU of its local rank out of the job's visible GPUs (SLURM's
    CUDA_VISIBLE_DEVICES names the node's real indices, not 0..n-1).
    """
    from submitit.helpers import TorchDistributedEnvironment

    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    dist_env = TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    if len(visible) >= dist_env.local_world_size > 1:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible[dist_env.local_rank]


# ------------------------------------------------------------------ submission

def run_stage(stage: str, fn: Callable, kwargs: dict, params: dict, checkpointable: bool = False,
              log_root: str | Path | None = None):
    """Run fn(**kwargs) for `stage` where OSV_LAUNCHER says; return its (rank-0) result."""
    return run_stages(stage, fn, [kwargs], params, checkpointable, log_root)[0]


def run_stages(stage: str, fn: Callable, calls: list[dict], params: dict, checkpointable: bool = False,
               log_root: str | Path | None = None) -> list:
    """fn(**kwargs) for every kwargs of `calls`, the stage's parts: in this process one after the
    other, or submitted all at once as jobs of the stage's resources and then waited for (a part
    that fails does not stop the others; the first failure is raised once all have ended)."""
    from osv import timing

    mode = launcher_mode()
    if mode == "none":
        pin_threads(params, stage)
        results = [fn(**kwargs) for kwargs in calls]
        for kwargs in calls:
            timing.finish(stage, kwargs.get("out"), kwargs.get("method_name"))
        return results
    timing.delegated()  # the jobs measure themselves; this process only waits
    started = [_start(stage, fn, kwargs, params, mode, checkpointable, log_root) for kwargs in calls]
    results, errors = [], []
    for job, record in started:
        try:
            results.append(wait(job, stage, mode))
            record.clear()
        except LaunchError as exc:
            results.append(None)
            errors.append(exc)
    if errors:
        if len(errors) > 1:
            print(f"[osv {stage}] {len(errors)} of {len(calls)} jobs failed; the first:", flush=True)
        raise errors[0]
    return results


def _start(stage: str, fn: Callable, kwargs: dict, params: dict, mode: str, checkpointable: bool,
           log_root: str | Path | None):
    """(job, record): the call's job, reattached (slurm) or submitted now."""
    res = job_resources(params, stage)
    tasks = res["nodes"] * res["tasks_per_node"]
    record = JobRecord(stage, kwargs, log_root)
    job = record.reattach(tasks, call_outputs(fn, kwargs)) if mode == "slurm" else None
    if job is None:
        cls = CheckpointableStageCall if checkpointable or hasattr(fn, "checkpoint") else StageCall
        call = cls(stage, fn, kwargs, tasks)
        folder = job_folder(stage, log_root)
        executor = make_executor(stage, mode, res, folder, job_name(stage, kwargs))
        job = submit(executor, call)
        record.write(job, folder)
        print(f"[osv {stage}] submitted {mode} job {job.job_id}, logs in {folder}", flush=True)
    return job, record


def job_resources(params: dict, stage: str) -> dict:
    """resources.<stage> of params, with what the front end asked for instead: the Snakemake rules
    pass their mem_mb, runtime (minutes) and gpu resources (params' by default, or
    --set-resources / --default-resources) as OSV_RESOURCES."""
    from osv.params import resources_for

    res = dict(resources_for(params, stage))
    text = os.environ.get(ENV_RESOURCES, "").strip()
    try:
        asked = {k.strip(): float(v) for k, v in (item.split("=", 1) for item in text.split(",") if item.strip())}
    except ValueError:
        raise LaunchError(f"{ENV_RESOURCES}={text!r}: expected mem_mb=N,runtime=N,gpu=N") from None
    unknown = set(asked) - {"mem_mb", "runtime", "gpu"}
    if unknown or any(v < 0 for v in asked.values()):
        raise LaunchError(f"{ENV_RESOURCES}={text!r}: expected non-negative mem_mb, runtime, gpu (got {sorted(asked)})")
    if "mem_mb" in asked:
        res["mem_gb"] = asked["mem_mb"] / 1024
    if "runtime" in asked:
        res["timeout_min"] = max(1, round(asked["runtime"]))
    if "gpu" in asked:
        res["gpus"] = round(asked["gpu"])
    return res


def call_outputs(fn: Callable, kwargs: dict) -> list[Path]:
    """The files a call writes: fn.outputs(**kwargs) where the function says, else its out, metrics
    and plots arguments. A completed job is reused only while they all exist."""
    own = getattr(fn, "outputs", None)
    if callable(own):
        return [Path(p) for p in own(**kwargs)]
    return [Path(kwargs[k]) for k in ("out", "metrics", "plots") if kwargs.get(k)]


def job_name(stage: str, kwargs: dict) -> str:
    """osv-<stage>[-<run or method>][-part<K>]: squeue and sacct say which instance a job is."""
    parts = [f"osv-{stage}"]
    instance = kwargs.get("run") or kwargs.get("method_name") or kwargs.get("method")
    if isinstance(instance, str):
        parts.append(instance)
    for key in ("part", "n"):
        if isinstance(kwargs.get(key), int):
            parts.append(f"part{kwargs[key]}")
    return "-".join(parts)


class JobRecord:
    """The job a stage instance's call was submitted as, kept until the call returns.

    A submitting process that dies (logout: SIGHUP; a killed Snakemake) leaves its SLURM job
    running. Rerun, the same call (same stage, arguments and params) finds the record: a job
    still queued or running is waited for again instead of submitted twice; one that completed
    gives its result; one that failed or vanished is submitted anew (and resumes from its
    checkpoints). A record of a call with other arguments or params cancels that job: two
    jobs must never write the same outputs.
    """

    def __init__(self, stage: str, kwargs: dict, log_root: str | Path | None = None):
        import hashlib
        import json

        text = json.dumps(kwargs, sort_keys=True, default=str)
        outputs = json.dumps({k: v for k, v in kwargs.items() if k != "params"}, sort_keys=True, default=str)
        self.call = hashlib.sha256(text.encode()).hexdigest()
        root = Path(log_root or os.environ.get(ENV_LOG_ROOT, DEFAULT_LOG_ROOT)).resolve()
        # keyed by the instance (its paths), so a changed params file finds the old job
        self.path = root / stage / f"job-{hashlib.sha256(outputs.encode()).hexdigest()[:16]}.json"
        self.stage = stage

    def write(self, job, folder: Path) -> None:
        from osv.atomic import write_json

        write_json(self.path, {"job_id": str(job.job_id), "folder": str(folder), "call": self.call})

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)

    def reattach(self, tasks: int, outputs: list[Path] = ()):
        """The recorded SLURM job if it is still this call's and alive, or done with its outputs
        still there, else None."""
        import json

        import submitit

        try:
            rec = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        state = scheduler_state(rec["job_id"])
        alive = state in ACTIVE_STATES
        if rec.get("call") != self.call:
            if alive:
                subprocess.run(["scancel", rec["job_id"]], check=False)
                print(f"[osv {self.stage}] cancelled job {rec['job_id']}: it was submitted with other arguments "
                      "or params", flush=True)
            return None
        job = submitit.SlurmJob(folder=rec["folder"], job_id=rec["job_id"], tasks=tuple(range(tasks)))
        gone = [str(p) for p in outputs if not Path(p).exists()]
        if state == "COMPLETED" and gone:  # e.g. Snakemake cleared an interrupted rule's outputs
            print(f"[osv {self.stage}] job {rec['job_id']} completed, but {', '.join(gone)} is gone: submitting "
                  "again (it resumes from its own checkpoints or shards)", flush=True)
            return None
        if alive or (state == "COMPLETED" and _results_ready(job)):
            print(f"[osv {self.stage}] reattached to slurm job {rec['job_id']} ({state}), logs in {rec['folder']}",
                  flush=True)
            return job
        return None


def job_folder(stage: str, log_root: str | Path | None = None) -> Path:
    root = Path(log_root or os.environ.get(ENV_LOG_ROOT, DEFAULT_LOG_ROOT)).resolve()
    unique = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{time.monotonic_ns() % 1_000_000:06d}"
    return root / stage / unique


def executor_parameters(stage: str, res: dict, name: str | None = None) -> dict:
    """submitit parameters from a stage's resources (None values left to the cluster defaults)."""
    extra = {"chdir": os.getcwd(), **(res.get("sbatch_extra") or {})}  # relative paths resolve as here
    out = {
        "name": name or f"osv-{stage}",
        "gpus_per_node": res["gpus"],
        "tasks_per_node": res["tasks_per_node"],
        "nodes": res["nodes"],
        "cpus_per_task": res["cpus_per_task"],
        "mem_gb": res["mem_gb"],
        "timeout_min": res["timeout_min"],
        "slurm_partition": res.get("partition"),
        "slurm_account": res.get("account"),
        "slurm_qos": res.get("qos"),
        "slurm_constraint": res.get("constraint"),
        "slurm_additional_parameters": extra,
    }
    return {k: v for k, v in out.items() if v is not None}


def make_executor(stage: str, mode: str, res: dict, folder: Path, name: str | None = None):
    import submitit

    # cluster is explicit: with srun on PATH, AutoExecutor would pick slurm by itself.
    executor = submitit.AutoExecutor(folder=folder, cluster=mode)
    params = executor_parameters(stage, res, name)
    if mode == "local" and params["nodes"] != 1:
        raise LaunchError(f"resources.{stage}.nodes={params['nodes']}: the local launcher runs on one node")
    executor.update_parameters(**params)
    return executor


def submit(executor, call):
    """Submit outside any surrounding SLURM allocation's variables, keeping SLURM_CONF."""
    from submitit.helpers import clean_env

    conf = os.environ.get("SLURM_CONF")
    with clean_env():
        if conf:
            os.environ["SLURM_CONF"] = conf
        try:
            return executor.submit(call)
        finally:
            os.environ.pop("SLURM_CONF", None)  # clean_env restores the original


# --------------------------------------------------------------------- waiting

class LogTail:
    """Print what a job appends to its stdout/stderr files, line by line, with a prefix."""

    def __init__(self, paths: list[Path], prefix: str):
        self.offsets = {p: 0 for p in paths}
        self.partial = {p: "" for p in paths}
        self.prefix = prefix

    def pump(self) -> None:
        for path in self.offsets:
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                continue
            if size < self.offsets[path]:  # truncated (a requeue without append): start again
                self.offsets[path] = 0
            if size == self.offsets[path]:
                continue
            with path.open("rb") as f:
                f.seek(self.offsets[path])
                chunk = f.read(size - self.offsets[path]).decode("utf-8", "replace")
            self.offsets[path] = size
            lines = (self.partial[path] + chunk).split("\n")
            self.partial[path] = lines.pop()
            out = getattr(sys.stdout, "unstamped", sys.stdout)  # the job's lines carry its own timestamps
            for line in lines:
                line = line.rstrip("\r").rsplit("\r", 1)[-1]  # progress bars: their last state
                if line:
                    print(f"{self.prefix}{line}", file=out, flush=True)


def scheduler_state(job_id: str) -> str | None:
    """The job's SLURM state from sacct (latest incarnation), else squeue; None if unknown."""
    for cmd in (["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State"],
                ["squeue", "-h", "-j", job_id, "-o", "%T"]):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        lines = [ln.split()[0] for ln in out.stdout.splitlines() if ln.strip()]
        if out.returncode == 0 and lines:
            return lines[-1].rstrip("+").upper()
        if cmd[0] == "squeue" and "Invalid job id" in out.stderr:
            return "GONE"  # neither accounting nor the queue knows it any more
    return None


def _tasks(job) -> list:
    return [job.task(i) for i in range(job.num_tasks)]


def _results_ready(job) -> bool:
    return all(t.paths.result_pickle.exists() for t in _tasks(job))


def _log_paths(job) -> list[Path]:
    first = job.task(0).paths
    return [first.stdout, first.stderr]


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return f"(no {path.name})"


def wait(job, stage: str, mode: str):
    """Stream logs until every task's result is in; return task 0's result or raise LaunchError."""
    tail = LogTail(_log_paths(job), prefix=f"[{stage} {job.job_id}] ")
    previous = _cancel_on_sigterm(job)
    try:
        if mode == "debug":
            return _collect(job, stage, mode)
        _poll_until_done(job, stage, mode, tail)
        tail.pump()
        return _collect(job, stage, mode)
    except KeyboardInterrupt:
        job.cancel(check=False)
        raise
    finally:
        tail.pump()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _poll_until_done(job, stage: str, mode: str, tail: LogTail) -> None:
    ended_at, next_check, interval, state = None, time.monotonic() + STATE_POLL_S, STATE_POLL_S, None
    while not _results_ready(job):
        tail.pump()
        now = time.monotonic()
        if mode == "local":
            if job.done():
                return  # _collect waits briefly for a result file, then raises
        elif now >= next_check:
            state = scheduler_state(job.job_id)
            ended = state is not None and state not in ACTIVE_STATES
            ended_at = (ended_at or now) if ended else None
            # a cancelled job never writes a result; any other end may, late, on a slow file system
            if ended_at is not None and (state == "CANCELLED" or now - ended_at >= RESULT_GRACE_S):
                waited = "" if state == "CANCELLED" else f" (waited {RESULT_GRACE_S:.0f}s for one)"
                raise LaunchError(_failure(job, stage, mode, f"ended in state {state} without a result{waited}"))
            interval = STATE_POLL_S if ended else min(2 * interval, STATE_POLL_MAX_S)
            next_check = now + interval
        time.sleep(LOG_POLL_S)


def _collect(job, stage: str, mode: str):
    from submitit.core.utils import FailedJobError, UncompletedJobError

    try:
        if mode == "debug" and not sys.stdin.isatty():
            return _debug_result(job)
        return job.results()[0]
    except (FailedJobError, UncompletedJobError) as exc:
        raise LaunchError(_failure(job, stage, mode, f"failed:\n{exc}")) from None


def _debug_result(job):
    """DebugJob.results() opens pdb on an error; without a terminal, report the traceback instead."""
    import pdb

    from submitit.core.utils import FailedJobError

    original = pdb.post_mortem
    pdb.post_mortem = lambda *a, **k: None
    try:
        return job.results()[0]
    except Exception as exc:
        import traceback

        trace = "".join(traceback.format_exception(exc))
        raise FailedJobError(f"Job raised in the debug executor:\n{trace}") from exc
    finally:
        pdb.post_mortem = original


def _failure(job, stage: str, mode: str, what: str) -> str:
    out, err = _log_paths(job)
    msg = [f"osv {stage}: {mode} job {job.job_id} {what}", f"logs: {out}", f"      {err}"]
    if "trace" not in what:  # no remote traceback: show what the job printed last
        msg += [f"--- last lines of {err.name} ---", _tail(err)]
    return "\n".join(msg)


def _cancel_on_sigterm(job):
    """Cancel the job if this waiting process is terminated (Snakemake stopping); returns the old handler."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        job.cancel(check=False)
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, handler)
