"""Shared fixtures: the one-node SLURM cluster (once per session) and a job-friendly environment."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
CLUSTER_SCRIPT = REPO / "scripts" / "slurm_cluster.sh"
SLURM_SCRATCH = Path(os.environ.get("OSV_SLURM_DIR", "/tmp/osv-slurm"))


def _cluster(action: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER_SCRIPT), action, str(SLURM_SCRATCH)], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running one-node SLURM (2 CPUs, 2 fake GPUs, sacct). Started once, stopped at the end
    unless it was already running before the session (then it is reused and left alone)."""
    if os.geteuid() != 0:
        pytest.skip("the one-node SLURM cluster needs root (it starts munged, mariadb, slurmd)")
    was_running = _cluster("status", timeout=60).returncode == 0
    started = _cluster("start")
    if started.returncode != 0:
        pytest.fail(f"scripts/slurm_cluster.sh start failed (rc {started.returncode}):\n"
                    f"{started.stdout}\n{started.stderr}")
    exports = [ln for ln in started.stdout.splitlines() if ln.startswith("export SLURM_CONF=")]
    if not exports:
        pytest.fail(f"scripts/slurm_cluster.sh start printed no SLURM_CONF:\n{started.stdout}\n{started.stderr}")
    conf = exports[-1].split("=", 1)[1]
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    yield {"conf": conf, "scratch": SLURM_SCRATCH, "log": started.stderr.strip()}
    if previous is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = previous
    if not was_running:
        _cluster("stop", timeout=120)


@pytest.fixture
def launch_env(tmp_path, monkeypatch):
    """Run jobs from tmp_path with their logs there; job processes can import the test modules."""
    paths = [str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in paths if p))
    monkeypatch.setenv("OSV_SUBMITIT_LOGS", str(tmp_path / "logs"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    """An online huggingface_hub with a fresh cache, for tests that serve a hub on 127.0.0.1."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("OSV_DOWNLOAD_DIR", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # huggingface_hub reads HF_HUB_OFFLINE once, at import (an earlier test may have imported it offline)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
