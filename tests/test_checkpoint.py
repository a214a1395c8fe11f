"""Checkpoints: atomic step folders, weights_only state, pruning, RNG round trip, and a run interrupted
by a signal at a random step that resumes to bit-identical final weights."""

from __future__ import annotations

import random
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_train import make_workspace, tiny_params, train

from osv.train import checkpoint as ck


def test_save_load_prune_and_rng_roundtrip(tmp_path):
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    state = {"step": 0, "rng": ck.rng_state(), "opt": {"state": {}, "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.99)}]}}
    expected = (torch.rand(3), np.random.rand(3), random.random())
    for step in (1, 2, 3):
        state["step"] = step
        ck.save_checkpoint(tmp_path, step, {"student": {"w": torch.full((2,), float(step))}, "disc": {}}, state,
                           keep_last=2, texts={"curves.csv": "step\n1\n"})
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step-0000002", "step-0000003"]
    (ck.checkpoints_root(tmp_path) / ".step-0000004.abc.tmp").mkdir()  # an interrupted write is ignored
    weights, loaded, texts = ck.load_checkpoint(ck.latest_checkpoint(tmp_path))
    assert loaded["step"] == 3 and weights["student"]["w"].tolist() == [3.0, 3.0] and weights["disc"] == {}
    assert texts["curves.csv"].startswith("step")
    ck.set_rng_state(loaded["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def _export_tensors(folder):
    out = {}
    for name in ("student", "ema", "disc"):
        out.update({f"{name}/{k}": v for k, v in load_file(str(folder / f"{name}.safetensors")).items()})
    out.update({f"unet/{k}": v for k, v in load_file(str(folder / "unet/diffusion_pytorch_model.safetensors")).items()})
    return out


def test_interrupted_run_resumes_bit_exactly(tmp_path, monkeypatch):
    from osv.train.distill import SIGNAL_AT_ENV
    from osv.train.loop import TrainingInterrupted

    torch.set_num_threads(1)
    params = tiny_params({"acd": {"steps": 4}})
    ws = make_workspace(tmp_path, params)
    run = "abl_b_no_stage1"  # ACD from the teacher: teacher solve, EMA target, discriminator, resolution switch
    train(params, ws, tmp_path, run)
    reference = _export_tensors(tmp_path / "models" / run)
    ref_csv = (tmp_path / "plots/train" / f"{run}.csv").read_text()
    shutil.rmtree(tmp_path / "runs" / run)
    shutil.rmtree(tmp_path / "models" / run)

    k = random.Random().randint(1, params["acd"]["steps"] - 1)
    monkeypatch.setenv(SIGNAL_AT_ENV, str(k))
    with pytest.raises(TrainingInterrupted, match=f"step {k}"):
        train(params, ws, tmp_path, run)
    assert ck.latest_checkpoint(tmp_path / "runs" / run).name == f"step-{k:07d}"
    assert not (tmp_path / "models" / run).exists()
    monkeypatch.delenv(SIGNAL_AT_ENV)
    train(params, ws, tmp_path, run)

    resumed = _export_tensors(tmp_path / "models" / run)
    assert resumed.keys() == reference.keys()
    different = [name for name in reference if not torch.equal(reference[name], resumed[name])]
    assert not different, f"interrupted at step {k}: {len(different)} tensors differ, e.g. {different[:3]}"
    assert (tmp_path / "plots/train" / f"{run}.csv").read_text() == ref_csv


def _save(run, step, **kw):
    return ck.save_checkpoint(run, step, {"student": {"w": torch.full((64,), float(step))}}, {"step": step},
                              keep_last=5, texts={"curves.csv": "step\n"}, **kw)


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    _save(tmp_path, 1)
    bad = _save(tmp_path, 2)
    shard = bad / "student.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ck.CheckpointError, match=f"{shard}: truncated"):
        ck.load_checkpoint(bad)
    with pytest.warns(UserWarning, match=f"{bad} is damaged, moved to {tmp_path / 'corrupt' / 'step-0000002'}"):
        path, (weights, state, _) = ck.load_latest_good(tmp_path)
    assert path.name == "step-0000001" and state["step"] == 1 and weights["student"]["w"][0] == 1.0
    assert (tmp_path / "corrupt" / "step-0000002" / "student.safetensors").exists()  # set aside, not deleted
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step-0000001"]


def test_changed_or_missing_checkpoint_files_are_named(tmp_path):
    path = _save(tmp_path, 1)
    state = path / ck.STATE_FILE
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    with pytest.raises(ck.CheckpointError, match=f"{state}: content changed"):
        ck.load_checkpoint(path)
    (path / "curves.csv").unlink()
    with pytest.raises(ck.CheckpointError, match=f"{path / 'curves.csv'}: missing"):
        ck.load_checkpoint(path)
    with pytest.warns(UserWarning, match="damaged"):
        assert ck.load_latest_good(tmp_path) == (None, None)


def test_checkpoint_without_manifest_loads_and_names_an_unreadable_file(tmp_path):
    path = _save(tmp_path, 1)
    (path / ck.MANIFEST).unlink()  # as written before checkpoints carried manifests
    with pytest.warns(UserWarning, match="unverified"):
        assert ck.load_checkpoint(path)[1]["step"] == 1
    (path / "student.safetensors").write_bytes(b"\0" * 16)
    with pytest.warns(UserWarning, match="unverified"), \
            pytest.raises(ck.CheckpointError, match=f"{path / 'student.safetensors'}: unreadable"):
        ck.load_checkpoint(path)


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs: a real full disk (needs root; the CI runs as root)."""
    import os
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "--lazy", str(disk)], check=True)  # a failed writer may still hold a file open


# Too big: the weights (safetensors' SafetensorError) or the state (torch.save's "unexpected pos").
@pytest.mark.parametrize("big", ["weights", "state"])
def test_full_disk_during_checkpoint_names_the_path_and_the_cause(small_disk, big):
    run = small_disk / "run"
    _save(run, 1)
    large = {"w": torch.zeros(100_000)}
    target = run / "checkpoints" / "step-0000002"
    with pytest.raises(OSError, match=f"writing {target}: No space left on device"):
        ck.save_checkpoint(run, 2, {"student": large if big == "weights" else {"w": torch.zeros(4)}},
                           {"step": 2, "big": large if big == "state" else {}}, keep_last=5)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-0000001"]  # no partial folder left
    assert ck.load_latest_good(run)[0].name == "step-0000001"
