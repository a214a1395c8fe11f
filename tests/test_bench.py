"""`osv bench step` and `osv bench vae` run end to end on the small models and print their numbers."""

from __future__ import annotations

import json
from pathlib import Path

from osv.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_bench_step_reports_each_evaluation_and_the_ratio(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["bench", "step", "--stages", "acd", "--front-ends", "latent", "--resolutions", "low",
                 "--steps", "1", "--repeats", "1", "--warmup", "0", "--json"]) == 0
    out = capsys.readouterr().out
    (row,) = json.loads(out[out.index("{"):])["results"]
    assert (row["stage"], row["front_end"], row["resolution"]) == ("acd", "latent", "low")
    parts = row["components_s"]
    assert any(k.startswith("teacher solve") for k in parts) and any(k.startswith("student") for k in parts)
    assert row["floor_s"] == sum(parts.values()) and row["train_step_s"] > 0
    assert row["ratio"] == row["train_step_s"] / row["floor_s"]


def test_bench_vae_times_both_steps_and_profiles(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["bench", "vae", "--steps", "1", "--json"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{"):])
    steps = {r["step"]: r for r in result["steps"]}
    assert set(steps) == {"crop", "whole-frame fine-tune"}
    assert all(r["s_per_step"] > 0 and r["s_per_step_conv3d"] > 0 for r in steps.values())
    assert result["profile_crop_step"] and 0 < result["profile_crop_step"][0][1] <= 1
