"""Per-job timing, measured in the process that does a stage's work, and the table of a run.

Every stage job records wall time, CPU time (user+sys, children included), peak RSS, threads and
start-up time (process start -> the stage's command or job function begins: interpreter, imports,
argument parsing). It is measured where the work runs, so it is right in-process (Snakemake,
`dvc repro`) and in a submitit job (local or SLURM: `osv.launch.StageCall` marks the job's own
start). Where it is kept (a declared output of the stage's rule in both front ends):

- stages with a metrics file (vae, teacher, train, fvd, report): a "timing" block in the
  `*.provenance.json` beside it (`osv.provenance.write_metrics`);
- data, weights, encode: `<out>.timing.json` beside their output folder. Not inside it: those
  folders are byte-identical on a rerun and DVC hashes them as inputs of later stages, so a
  timing file inside would rerun everything downstream;
- generate: `samples/M/timing.json` (that folder already varies between runs: seconds per video).

Plumbing, not a code dependency of any stage (osv.dependencies.PLUMBING): timing changes no result.
Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

STAGES = ("data", "weights", "vae", "encode", "teacher", "train", "generate", "fvd", "claims", "report")
# The CPU flags that decide precision (osv.precision): native bf16, AVX-512, AVX2.
PRECISION_FLAGS = ("avx512_bf16", "amx_bf16", "avx512f", "avx2")

_state = {"work_start": None, "delegated": False, "launcher": None}


def process_start() -> float | None:
    """This process's start (epoch seconds) from the kernel, so start-up includes the interpreter and
    every import; a timestamp taken in Python would come after them. Its age is uptime minus its
    start in clock ticks since boot (both 10 ms resolution; /proc/stat's btime has whole seconds)."""
    try:
        with open("/proc/self/stat") as f:  # field 22 (after the parenthesised name): start in ticks
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 -- no psutil, or no permission: start-up unknown, never guessed
        return None


def mark_work_start() -> None:
    """The stage's work begins now (osv.cli before the command function; a submitit job before fn)."""
    _state["work_start"], _state["delegated"] = time.time(), False
    # how this job was launched (a submitit job then sets OSV_LAUNCHER=none for nested calls)
    _state["launcher"] = os.environ.get("OSV_LAUNCHER") or "none"


def delegated() -> None:
    """The work runs in another process (a submitit job): this waiting process records nothing."""
    _state["delegated"] = True


def compute_threads() -> int:
    """Threads the stage computes on: torch's setting where torch is loaded (osv.launch.pin_threads
    sets it), else OMP_NUM_THREADS (what the front end granted), else one (plain Python)."""
    if "torch" in sys.modules:
        return sys.modules["torch"].get_num_threads()
    return int(os.environ.get("OMP_NUM_THREADS") or 1)


def _os_threads() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def measure() -> dict:
    """This process's timing so far (call it when the stage's work is done)."""
    now, start = time.time(), process_start()
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    work = _state["work_start"]
    out = {"wall_s": None if start is None else round(now - start, 3),
           "cpu_s": round(own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime, 3),
           # this process's peak (KiB on Linux); not the children's: a forked child inherits its
           # parent's high-water mark, so theirs would repeat ours
           "peak_rss_mb": round(own.ru_maxrss / 1024, 1),
           "threads": compute_threads(), "os_threads": _os_threads(),
           "startup_s": None if start is None or work is None else round(work - start, 3),
           "work_s": None if work is None else round(now - work, 3),
           "pid": os.getpid(), "launcher": _state["launcher"] or os.environ.get("OSV_LAUNCHER") or "none"}
    if "SLURM_JOB_ID" in os.environ:
        out["slurm_job"] = os.environ["SLURM_JOB_ID"]
    return out


def record_path(stage: str, out: str | os.PathLike | None) -> Path | None:
    """Where a stage without a metrics file keeps its timing record (None: its provenance holds it)."""
    if out is None:
        return None
    if stage in ("data", "weights", "encode"):
        out = Path(out)
        return out.with_name(f"{out.name}.timing.json")
    if stage == "generate":
        return Path(out) / "timing.json"
    return None


def finish(stage: str, out: str | os.PathLike | None, instance: str | None = None) -> Path | None:
    """Write the timing record of a stage without metrics file, in the process that did the work (an
    in-process run_stage writes it, then osv.cli again, a moment later: the same process, the same job)."""
    path = record_path(stage, out)
    rank = os.environ.get("RANK", "0")  # a multi-task job: rank 0 keeps the record, as it keeps the outputs
    if path is None or _state["delegated"] or rank != "0" or not path.parent.is_dir():
        return None
    from osv.atomic import write_json
    from osv.precision import cpu_name, precision_flags  # no torch

    write_json(path, {"stage": stage, "instance": instance, "cpu": cpu_name(),
                      "cpu_flags": precision_flags(),
                      "timing": measure()})
    return path


# ------------------------------------------------------------------ the table of a run

def expected_records(params: dict, root: str | os.PathLike = ".", metrics: str | os.PathLike | None = None,
                     samples: str | os.PathLike | None = None, reports: str | os.PathLike | None = None
                     ) -> list[tuple[str, str | None, Path]]:
    """(stage, instance, file holding its timing) of every job of the DAG, as the rules name them."""
    root = Path(root)
    metrics, samples = Path(metrics or root / "metrics"), Path(samples or root / "samples")
    reports = Path(reports or root / "reports")
    jobs = [("data", None, record_path("data", root / "data" / "clips")),
            ("weights", None, record_path("weights", root / "models" / "base")),
            ("vae", None, metrics / "vae.provenance.json"),
            ("encode", None, record_path("encode", root / "data" / "latents")),
            ("teacher", None, metrics / "teacher.provenance.json")]
    jobs += [("train", run, metrics / "train" / f"{run}.provenance.json") for run in params["train"]["runs"]]
    methods = list(params["eval"]["methods"])
    jobs += [("generate", m, record_path("generate", samples / m)) for m in methods]
    jobs += [("fvd", m, metrics / "eval" / f"{m}.provenance.json") for m in methods]
    jobs.append(("claims", None, metrics / "claims.provenance.json"))
    return jobs + [("report", None, reports / "metrics.provenance.json")]


def read_record(path: Path) -> dict | None:
    """The file's timing block with its CPU description; None if the file or its block is missing."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc.get("timing"), dict):
        return None
    return {**doc["timing"], "cpu": doc.get("cpu"), "cpu_flags": doc.get("cpu_flags") or []}


def collect(jobs: list[tuple[str, str | None, Path]]) -> tuple[dict[str, list[dict]], list[tuple]]:
    """Records per stage kind, and the jobs that have none (listed as missing, never estimated)."""
    found, missing = {s: [] for s in STAGES}, []
    for stage, instance, path in jobs:
        rec = read_record(path)
        if rec is None:
            missing.append((stage, instance))
        else:
            found.setdefault(stage, []).append(rec)
    return found, missing


def _num(values: list, fn) -> float | None:
    values = [v for v in values if isinstance(v, int | float)]
    return fn(values) if values else None


def _fmt(v, digits: int = 1) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def table(found: dict[str, list[dict]], missing: list[tuple], expected: dict[str, int] | None = None) -> str:
    """The Markdown timing table: one row per stage kind, the CPU line, and the missing jobs."""
    lines = ["| stage | jobs | wall s (sum) | wall s (max) | CPU s (sum) | peak RSS MB (max) | start-up s (median) "
             "| threads |", "|---|---|---|---|---|---|---|---|"]
    for stage in STAGES:
        recs = found.get(stage, [])
        jobs = f"{len(recs)}" + (f" of {expected[stage]}" if expected and expected.get(stage) != len(recs) else "")
        wall = [r.get("wall_s") for r in recs]
        threads = sorted({r.get("threads") for r in recs if r.get("threads") is not None})
        lines.append(f"| {stage} | {jobs} | {_fmt(_num(wall, sum))} | {_fmt(_num(wall, max))} "
                     f"| {_fmt(_num([r.get('cpu_s') for r in recs], sum))} "
                     f"| {_fmt(_num([r.get('peak_rss_mb') for r in recs], max), 0)} "
                     f"| {_fmt(_num([r.get('startup_s') for r in recs], statistics.median), 2)} "
                     f"| {', '.join(map(str, threads)) or '—'} |")
    every = [r for recs in found.values() for r in recs]
    cpus = sorted({r["cpu"] for r in every if r.get("cpu")})
    flags = {f for r in every for f in r.get("cpu_flags", [])}
    threads = sorted({r.get("threads") for r in every if r.get("threads") is not None})
    lines += ["", f"CPU: {'; '.join(cpus) or 'unknown'}; precision flags: "
              + ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in PRECISION_FLAGS)
              + f"; threads per job: {', '.join(map(str, threads)) or 'unknown'}."]
    if missing:
        by_stage = {}
        for stage, instance in missing:
            by_stage.setdefault(stage, []).append(instance)
        named = [s if names == [None] else f"{s} ({', '.join(map(str, names))})" for s, names in by_stage.items()]
        lines += ["", f"Missing timing records ({len(missing)} job{'s' if len(missing) != 1 else ''}, not counted above): " + "; ".join(named) + "."]
    return "\n".join(lines) + "\n"


def run_table(params: dict, root: str | os.PathLike = ".", **dirs) -> str:
    """The timing table of the run in `root` (as `osv report` and `osv bench timing` print it)."""
    jobs = expected_records(params, root, **dirs)
    found, missing = collect(jobs)
    expected = {s: sum(1 for j in jobs if j[0] == s) for s in STAGES}
    return table(found, missing, expected)


def record_parts(stage: str, out: str | os.PathLike, parts: list[dict]) -> Path | None:
    """The timing record of a stage fanned out into jobs (encode, generate): the parts' own records
    summed (wall, CPU and work seconds; start-up the median; peak RSS the largest), written where
    record_path puts the stage's record. This process only gathered: it records nothing of its own."""
    path = record_path(stage, out)
    if path is None or not parts:
        return None
    from osv.atomic import write_json
    from osv.precision import cpu_name, precision_flags  # no torch

    def total(key, fn=sum):
        values = [p[key] for p in parts if p.get(key) is not None]
        return round(fn(values), 3) if values else None

    merged = {"wall_s": total("wall_s"), "cpu_s": total("cpu_s"), "peak_rss_mb": total("peak_rss_mb", max),
              "threads": parts[0].get("threads"), "os_threads": total("os_threads", max),
              "startup_s": total("startup_s", statistics.median), "work_s": total("work_s"),
              "jobs": len(parts), "launcher": parts[0].get("launcher"),
              "slurm_jobs": [p["slurm_job"] for p in parts if "slurm_job" in p]}
    write_json(path, {"stage": stage, "instance": None, "cpu": cpu_name(), "cpu_flags": precision_flags(),
                      "timing": merged})
    _state["delegated"] = True  # osv.cli's finish() must not overwrite it with the gather's own
    return path
