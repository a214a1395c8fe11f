"""Per-job timing (osv/timing.py): recorded where a stage's work runs, gathered into the report's table;
`osv --help` lists the commands without importing them."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from osv import launch, timing
from osv.params import load_params

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


def plausible(t: dict) -> None:
    assert t["wall_s"] > 0 and t["cpu_s"] > 0 and t["peak_rss_mb"] > 0 and t["threads"] >= 1
    assert 0 < t["startup_s"] < t["wall_s"]


def job_writes_out(out: str, method_name: str) -> dict:
    """A stage work function (module level: a submitit job imports this module by name)."""
    Path(out).mkdir(parents=True, exist_ok=True)
    sum(i * i for i in range(200_000))  # some CPU time
    return {"pid": os.getpid()}


@pytest.fixture(scope="module")
def params():
    return load_params(REPO / "params.yaml")


def test_real_report_job_records_its_timing(tmp_path):
    """`osv report` as the rule runs it: its provenance holds this job's timing, and results.md the table."""
    env = {k: v for k, v in os.environ.items() if k != "OSV_LAUNCHER"}
    out = subprocess.run([sys.executable, "-m", "osv.cli", "report", "--params", str(REPO / "params.yaml"),
                          "--metrics", "metrics", "--samples", "samples", "--plots", "plots", "--out", "reports"],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    prov = json.loads((tmp_path / "reports" / "metrics.provenance.json").read_text())
    plausible(prov["timing"])
    assert prov["timing"]["pid"] != os.getpid() and "torch" in prov  # version without importing torch
    text = (tmp_path / "reports" / "results.md").read_text().split("## Timing")[1]
    assert "| report | 1 |" in text and "| data | 0 of 1 |" in text
    jobs = len(timing.expected_records(load_params(REPO / "params.yaml"))) - 1  # all but the report itself
    assert f"Missing timing records ({jobs} jobs" in text and "fvd (teacher_25, " in text


def test_in_process_stage_writes_timing_beside_its_output(tmp_path, params, monkeypatch):
    monkeypatch.delenv("OSV_LAUNCHER", raising=False)
    timing.mark_work_start()
    launch.run_stage("generate", job_writes_out, {"out": str(tmp_path / "samples" / "m"), "method_name": "m"}, params)
    rec = json.loads((tmp_path / "samples" / "m" / "timing.json").read_text())
    assert rec["stage"] == "generate" and rec["instance"] == "m" and rec["timing"]["pid"] == os.getpid()
    assert rec["timing"]["wall_s"] > 0 and rec["timing"]["cpu_s"] > 0 and rec["cpu_flags"] is not None
    assert timing.record_path("data", "data/clips") == Path("data/clips.timing.json")
    assert timing.record_path("encode", "data/latents/") == Path("data/latents.timing.json")
    assert timing.record_path("vae", "models/vae") is None  # its provenance holds it


def test_submitit_job_measures_itself(tmp_path, params, monkeypatch):
    """Under the local launcher the record is the job's (its own pid and start-up), not the waiter's."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OSV_SUBMITIT_LOGS", str(tmp_path / "logs"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("OSV_LAUNCHER", "local")
    out = tmp_path / "data" / "latents"
    result = launch.run_stage("encode", job_writes_out, {"out": str(out), "method_name": None}, params)
    timing.finish("encode", out)  # what osv.cli does afterwards: the waiting process must not overwrite
    rec = json.loads((tmp_path / "data" / "latents.timing.json").read_text())
    assert rec["timing"]["pid"] == result["pid"] != os.getpid() and rec["timing"]["launcher"] == "local"
    plausible(rec["timing"])


def write_record(path: Path, stage: str, wall: float, rss: float, threads: int = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"stage": stage, "cpu": "Test CPU", "cpu_flags": ["avx2", "avx512f"],
                                "timing": {"wall_s": wall, "cpu_s": wall / 2, "peak_rss_mb": rss,
                                           "startup_s": 0.5, "threads": threads}}))


def test_table_from_records_shows_missing_jobs(tmp_path, params):
    jobs = timing.expected_records(params, tmp_path)
    methods = list(params["eval"]["methods"])
    for stage, instance, path in jobs:
        if (stage, instance) != ("fvd", methods[1]):
            write_record(path, stage, 10.0 if stage == "train" else 2.0, 100.0 + len(str(instance)))
    found, missing = timing.collect(jobs)
    assert missing == [("fvd", methods[1])]
    text = timing.run_table(params, tmp_path)
    runs = len(params["train"]["runs"])
    assert f"| train | {runs} | {10.0 * runs:.1f} | 10.0 | {5.0 * runs:.1f} |" in text
    assert f"| fvd | {len(methods) - 1} of {len(methods)} | {2.0 * (len(methods) - 1):.1f} | 2.0 |" in text
    assert "| report | 1 | 2.0 | 2.0 | 1.0 | 104 | 0.50 | 1 |" in text
    assert "CPU: Test CPU; precision flags: avx512_bf16 no, amx_bf16 no, avx512f yes, avx2 yes" in text
    assert f"Missing timing records (1 job, not counted above): fvd ({methods[1]})." in text


def test_help_imports_no_command_module_and_lists_every_command():
    code = ("import sys\nfrom osv.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('LOADED', 'torch' in sys.modules, 'osv.vae' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "LOADED False False" in out
    from osv import cli

    for name in cli.COMMANDS:
        assert name in out
        sub = argparse.ArgumentParser().add_subparsers()
        __import__(cli.COMMANDS[name], fromlist=["register"]).register(sub)
        assert {a.dest: a.help for a in sub._choices_actions}[name] == cli.HELP[name]
