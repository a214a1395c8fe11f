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
