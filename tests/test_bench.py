"""`osv bench step`, `osv bench vae` and `osv bench train` run end to end on the small models and print their
numbers; `osv bench plan` turns a synthetic measurement into hand-computable GPU-hours."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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


def test_bench_train_runs_each_stage_through_train_step(tmp_path, capsys, monkeypatch):
    """`osv bench train` on the small models: stage 1, stage 2 and ablation e's front end, one timed
    iteration each in its own process, the package's build_nets and train_step, JSON with the numbers."""
    import math

    monkeypatch.chdir(ROOT)
    out = tmp_path / "bench.json"
    assert main(["bench", "train", "--shape", "small", "--device", "cpu", "--iters", "1", "--frames", "2",
                 "--width", "64", "--height", "32", "--stages", "lgp,acd,acd_vae", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    rows = {r["stage"]: r for r in result["results"]}
    assert list(rows) == ["lgp", "acd", "acd_vae"] and all(k in table for k in rows)
    for r in rows.values():
        assert "error" not in r, r
        for k in ("sec_per_iter", "peak_gib", "state_gib"):
            assert math.isfinite(r[k]) and r[k] > 0, (r["stage"], k, r[k])
        assert r["latent_shape"] == [2, 2, 4, 4, 8] and r["precision"] == "fp32" and r["device"] == "cpu"
        assert r["trainable_params"] > 0 and r["disc_trainable_params"] > 0
    assert not rows["lgp"]["teacher"] and rows["acd"]["teacher"] and rows["acd_vae"]["front_end"] == "vae"
    assert rows["acd"]["settings"]["acd.m"] == 5  # params.yaml's stage 2
    assert rows["acd"]["trainable_params"] > rows["lgp"]["trainable_params"]  # stage 2 unfreezes temporal blocks


def test_svd_shape_is_the_published_architecture():
    from osv.bench.train import model_configs
    from osv.models import DINOV2_SMALL, SVD_UNET_PUBLISHED, SVD_VAE

    cfg = model_configs("svd", 14)
    assert {k: cfg["unet"][k] for k in SVD_UNET_PUBLISHED} == SVD_UNET_PUBLISHED
    assert cfg["vae"] == SVD_VAE and cfg["vae"]["block_out_channels"] == [128, 256, 512, 512]
    assert {k: DINOV2_SMALL[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size")} \
        == {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "patch_size": 14}


def _synthetic_bench(path: Path) -> Path:
    """Measured at the paper's size (1024x576, 14 frames, batch 1): 3.6 s/iter; peaks 50 / 60 GiB."""
    from osv.bench.train import cost_settings
    from osv.params import load_params

    params = load_params(ROOT / "workflow/scales/paper.yaml")
    size = {"frames": 14, "width": 1024, "height": 576, "batch": 1, "device_name": "synthetic", "precision": "bf16"}
    rows = [{"stage": "lgp", **size, "sec_per_iter": 3.6, "peak_gib": 50.0, "state_gib": 20.0,
             "settings": cost_settings(params, "lgp")},
            {"stage": "acd", **size, "sec_per_iter": 3.6, "peak_gib": 60.0, "state_gib": 30.0,
             "settings": cost_settings(params, "acd")},
            {"stage": "acd_vae", "error": "CUDA out of memory: synthetic"}]
    path.write_text(json.dumps({"config": {}, "results": rows}))
    return path


def test_plan_gives_gpu_hours_of_the_paper_runs_and_flags_a_small_card(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    bench, out = _synthetic_bench(tmp_path / "bench.json"), tmp_path / "plan.json"
    assert main(["bench", "plan", "--card", "H100-80GB", "--bench", str(bench), "--json", str(out)]) == 0
    plan = json.loads(out.read_text())
    runs = {r["run"]: r for r in plan["rows"]}
    s1 = runs["stage1"]  # 2K iterations x 3.6 s = 2 h wall, x 8 GPUs = 16 GPU-hours
    assert (s1["gpus"], s1["steps"]) == (8, 2000)
    assert s1["wall_hours"] == pytest.approx(2.0) and s1["gpu_hours"] == pytest.approx(16.0)
    assert s1["peak_gib"] == pytest.approx(50.0) and s1["fits"] == "yes"
    # stage 2: 10K steps at 576x320 (3.6 x 576·320/(1024·576) = 1.125 s) + 10K at 1024x576 (3.6 s), 2 GPUs
    s2 = runs["stage2"]
    assert s2["gpus"] == 2 and s2["wall_hours"] == pytest.approx(47250 / 3600)
    assert s2["gpu_hours"] == pytest.approx(2 * 47250 / 3600) and s2["peak_gib"] == pytest.approx(60.0)
    assert any("scaled from 1024x576x14" in n for n in s2["notes"])
    assert any("acd.m: measured 5, run 1" in n for n in runs["abl_a_m1"]["notes"])
    assert any("no discriminator" in n for n in runs["abl_d_no_adv"]["notes"])
    assert runs["abl_e_vae_disc"]["status"] == "not measured" and "out of memory" in runs["abl_e_vae_disc"]["notes"][0]
    # longest init chain: stage1 (2 h) then abl_h_high_only (20K steps at 1024x576: 20 h)
    assert plan["critical_path"]["run"] == "abl_h_high_only"
    assert plan["critical_path"]["wall_hours"] == pytest.approx(22.0)
    text = capsys.readouterr().out
    assert "scaled from 1024x576x14" in text and "OVER MEMORY" not in text

    assert main(["bench", "plan", "--card", "A100-40GB", "--bench", str(bench), "--json", str(out)]) == 0
    plan = json.loads(out.read_text())
    assert "stage1" in plan["over_memory"] and "stage2" in plan["over_memory"]
    assert "OVER MEMORY on the A100-40GB: stage1" in capsys.readouterr().out


def test_plan_refuses_an_unknown_card(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    bench = _synthetic_bench(tmp_path / "bench.json")
    assert main(["bench", "plan", "--card", "V100-16GB", "--bench", str(bench)]) == 2
    err = capsys.readouterr().err
    assert "unknown card 'V100-16GB'" in err and all(c in err for c in ("A100-80GB", "H200-141GB", "RTX4090-24GB"))
