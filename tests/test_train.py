"""Training (osv.train): the teacher improves on held-out latents, both stages run and export a student
that diffusers loads and osv.samplers samples, a NaN stops the run and keeps the last good checkpoint.

The workspace helpers below are shared with test_checkpoint.py and test_distributed.py: small models
built from osv/configs (osv.weights.build_base), a small VAE, and a tiny latents folder in the
docs/design.md format (random latents; shapes are what matters here).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from osv.logs import unstamped

REPO = Path(__file__).resolve().parent.parent
TINY = {
    "data": {"frames": 4, "resolution": {"width": 32, "height": 32}, "low_resolution": {"width": 16, "height": 16}},
    "teacher": {"steps": 8, "batch_size": 2},
    "lgp": {"steps": 3, "batch_size": 2},
    "acd": {"steps": 4, "batch_size": 2, "m": 2,
            "resolution_schedule": [{"from_step": 0, "resolution": "low"}, {"from_step": 2, "resolution": "high"}]},
    "train": {"checkpoint_every": 100, "keep_last": 2},
}


def tiny_params(extra: dict | None = None) -> dict:
    from osv.params import deep_merge, validate

    params = deep_merge(yaml.safe_load((REPO / "params.yaml").read_text()), TINY)
    return validate(deep_merge(params, extra or {}))


def run_params(params: dict, run: str) -> dict:
    """What load_params(path, run=RUN) returns: the run's override merged in."""
    from osv.params import deep_merge

    return deep_merge(params, params["train"]["runs"][run].get("override", {}))


def write_latents(root: Path, params: dict, n_train: int = 6, n_test: int = 4, seed: int = 0) -> None:
    """data/latents in osv.encode's format (groups split/WxH, shards, root index.json),
    filled with random latents: the training tests need shapes and a readable folder, not real clips."""
    g = torch.Generator().manual_seed(seed)
    frames = params["data"]["frames"]
    groups = {}
    for split, n, keys in (("train", n_train, ("resolution", "low_resolution")), ("test", n_test, ("resolution",))):
        for key in keys:
            w, h = params["data"][key]["width"], params["data"][key]["height"]
            name = f"{split}/{w}x{h}"
            (root / name).mkdir(parents=True, exist_ok=True)
            still = torch.randn(n, 1, 4, h // 8, w // 8, generator=g)
            latents = still + 0.3 * torch.randn(n, frames, 4, h // 8, w // 8, generator=g)
            cond = latents[:, 0] / 0.18215 + 0.02 * torch.randn(n, 4, h // 8, w // 8, generator=g)
            tensors = {"latents": latents.contiguous(), "cond_latents": cond.contiguous(),
                       "image_embeds": torch.randn(n, 1, 64, generator=g),
                       "first_frame": torch.randint(0, 255, (n, 3, h, w), generator=g, dtype=torch.uint8)}
            save_file(tensors, str(root / name / "shard-00000.safetensors"))
            ids = [f"{split}-{i:04d}" for i in range(n)]
            groups[name] = {"folder": name, "count": n,
                            "shards": [{"file": "shard-00000.safetensors", "count": n, "clip_ids": ids}]}
    index = {"frames": frames, "fps": params["data"]["fps"], "scaling_factor": 0.18215, "latent_channels": 4,
             "noise_aug_strength": params["conditioning"]["noise_aug_strength"], "image_embed_dim": 64,
             "groups": groups}
    (root / "index.json").write_text(json.dumps(index))


def assert_numbers_only(path: Path) -> dict:
    """A metric file: every leaf a number; its provenance beside it says what made them. Returns the provenance."""
    from osv.provenance import provenance_path

    def leaves(d):
        return [x for v in d.values() for x in (leaves(v) if isinstance(v, dict) else [v])]

    values = leaves(json.loads(path.read_text()))
    assert values and all(isinstance(v, int | float) and not isinstance(v, bool) for v in values), path
    prov = json.loads(provenance_path(path).read_text())
    assert {"commit", "dirty", "params_sha256", "precision", "cpu"} <= set(prov), prov
    return prov


def ensure_latent_dataset() -> None:
    """Import osv.latents early (spawned workers call this before training)."""
    import osv.latents  # noqa: F401


def make_workspace(root: Path, params: dict, train_teacher: bool = False) -> dict[str, Path]:
    """models/base, models/vae, data/latents and models/teacher (linked base, or trained)."""
    from osv.models import build_small_vae
    from osv.train.teacher import teacher_run, write_pipeline_folder
    from osv.weights import build_base

    ensure_latent_dataset()
    paths = {k: root / v for k, v in (("base", "models/base"), ("vae", "models/vae"), ("latents", "data/latents"),
                                      ("teacher", "models/teacher"))}
    build_base(params, paths["base"])
    build_small_vae(0).save_pretrained(str(paths["vae"]))
    write_latents(paths["latents"], params)
    if train_teacher:
        paths["teacher_metrics"] = root / "metrics/teacher.json"
        teacher_run(params, str(paths["base"]), str(paths["vae"]), str(paths["latents"]), str(paths["teacher"]),
                    str(paths["teacher_metrics"]), str(root / "plots/teacher.csv"))
    else:
        write_pipeline_folder(paths["teacher"], paths["base"], paths["vae"])
    return paths


def train(params: dict, ws: dict, root: Path, run: str, **kw) -> dict:
    from osv.train.distill import train_run

    spec = params["train"]["runs"][run]
    init = ws["teacher"] if spec["init"] == "teacher" else root / "models" / spec["init"]
    return train_run(run_params(params, run), run, str(ws["teacher"]), str(init), str(ws["latents"]),
                     str(root / "runs" / run), str(root / "models" / run), str(root / f"metrics/train/{run}.json"),
                     str(root / f"plots/train/{run}.csv"), **kw)


# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("train")
    params = tiny_params()
    ws = make_workspace(root, params, train_teacher=True)
    return root, params, ws


def test_teacher_training_improves_heldout_numbers(trained):
    root, params, ws = trained
    metrics = json.loads(ws["teacher_metrics"].read_text())
    before, after = metrics["before"], metrics["after"]
    assert after["heldout_loss"] < before["heldout_loss"]
    assert after["denoise_mse"] < before["denoise_mse"]
    assert before["sample_stats_error"] > 0 and after["sample_stats_error"] > 0  # improves at params.yaml scale
    # a full pipeline folder: trained unet, the given vae, base's other parts and dinov2 for the discriminator
    from osv.models import load_pipeline

    pipe = load_pipeline(ws["teacher"])
    assert type(pipe).__name__ == "StableVideoDiffusionPipeline"
    assert (ws["teacher"] / "dinov2" / "config.json").is_file()
    assert load_file(str(ws["teacher"] / "vae/diffusion_pytorch_model.safetensors")).keys() == \
        load_file(str(ws["vae"] / "diffusion_pytorch_model.safetensors")).keys()
    rows = (root / "plots/teacher.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss") and len(rows) >= params["teacher"]["steps"] + 2
    prov = assert_numbers_only(ws["teacher_metrics"])
    assert prov["stage"] == "teacher" and prov["precision"] == "fp32" and prov["results"]["trained"] is True


def test_nan_in_teacher_training_stops_and_writes_nothing(trained, tmp_path, monkeypatch):
    from osv.numerics import INJECT_ENV, NonFiniteError
    from osv.provenance import provenance_path
    from osv.train.teacher import teacher_run

    root, params, ws = trained
    step = random.Random(0).randrange(params["teacher"]["steps"])
    monkeypatch.setenv(INJECT_ENV, f"teacher:{step}")
    out, metrics = tmp_path / "teacher", tmp_path / "teacher.json"
    with pytest.raises(NonFiniteError, match=rf"^osv teacher: non-finite loss at step {step} \(loss=nan\)"):
        teacher_run(params, str(ws["base"]), str(ws["vae"]), str(ws["latents"]), str(out), str(metrics),
                    str(tmp_path / "teacher.csv"))
    assert not out.exists() and not metrics.exists() and not provenance_path(metrics).exists()


def test_stage1_then_stage2_export_loads_and_samples(trained):
    from diffusers import UNetSpatioTemporalConditionModel

    from osv.conditioning import from_batch
    from osv.samplers import tts_sample
    from osv.sde import Denoiser
    from osv.train.logging import TRAIN_COLUMNS
    from osv.train.teacher import load_split

    root, params, ws = trained
    train(params, ws, root, "stage1")
    result = train(params, ws, root, "stage2")
    out = root / "models/stage2"
    for name in ("student.safetensors", "ema.safetensors", "disc.safetensors", "sampler.json", "unet/config.json"):
        assert (out / name).is_file(), name
    student = load_file(str(out / "student.safetensors"))
    assert any(".lora_" in k for k in student) and any("temporal_transformer_blocks" in k and ".lora_" not in k
                                                       for k in student)
    assert load_file(str(out / "ema.safetensors")).keys() == student.keys()
    sampler = json.loads((out / "sampler.json").read_text())
    assert sampler["sampler"] == "tts" and sampler["num_sigmas"] == params["sde"]["num_sigmas"]

    unet = UNetSpatioTemporalConditionModel.from_pretrained(str(out / "unet"))
    test = load_split(ws["latents"], "test", params, "cpu")
    cond = from_batch(test, params)
    sample = tts_sample(Denoiser(unet), cond, tuple(test["latents"].shape), generator=torch.Generator().manual_seed(0))
    assert sample.nfe == 2 and torch.isfinite(sample.latents).all()

    rows = (root / "plots/train/stage2.csv").read_text().splitlines()
    assert rows[0].split(",") == TRAIN_COLUMNS and len(rows) == params["acd"]["steps"] + 1
    from osv.dependencies import fingerprint
    from osv.provenance import read_metrics

    metrics = read_metrics(root / "metrics/train/stage2.json")
    assert "small models built from osv/configs" in metrics["protocol"]["weights"]
    assert metrics["protocol"]["init"] == "stage1" and result["final"]["loss_distance"] >= 0
    prov = assert_numbers_only(root / "metrics/train/stage2.json")
    assert prov["precision"] == "fp32" and prov["instance"] == "stage2"
    assert prov["params_sha256"] == fingerprint(run_params(params, "stage2"), "train", "stage2") == sampler["run"][
        "params_sha256"]


def test_nan_stops_run_and_last_checkpoint_loads(trained, tmp_path, monkeypatch, capsys):
    """`osv train` exits 3 with one line naming the step, keeps the last good checkpoint and writes no
    export or metrics; a rerun under other resources/eval settings resumes from that checkpoint."""
    from osv.cli import main
    from osv.numerics import INJECT_ENV
    from osv.provenance import provenance_path
    from osv.train.checkpoint import latest_checkpoint, load_checkpoint

    root, params, ws = trained
    run = "abl_d_stage1_noadv"
    params = tiny_params({"lgp": {"steps": 5, "lambda_adv": 0.0}, "train": {"checkpoint_every": 2}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out, metrics = root / "models" / run, root / f"metrics/train/{run}.json"
    monkeypatch.delenv("OSV_LAUNCHER", raising=False)
    monkeypatch.setenv(INJECT_ENV, "train:3")
    argv = ["train", "--params", str(tmp_path / "params.yaml"), "--run", run, "--teacher", str(ws["teacher"]),
            "--init", str(ws["teacher"]), "--latents", str(ws["latents"]), "--ckpt", str(root / "runs" / run),
            "--out", str(out), "--metrics", str(metrics), "--plots", str(root / f"plots/train/{run}.csv")]
    assert main(argv) == 3
    lines = [unstamped(ln) for ln in capsys.readouterr().err.splitlines() if "non-finite" in ln]
    assert len(lines) == 1 and lines[0].startswith("osv train: non-finite loss_g at step 3 (loss_g=nan)"), lines
    last = latest_checkpoint(root / "runs" / run)
    assert last is not None and last.name == "step-0000002"
    weights, state, _ = load_checkpoint(last)
    assert state["step"] == 2 and weights["student"] and not weights["disc"]
    assert all(torch.isfinite(v).all() for v in weights["student"].values())
    assert not out.exists() and not metrics.exists() and not provenance_path(metrics).exists()
    # the run resumes from that checkpoint and finishes once the NaN is gone; settings no run reads
    # (resources, eval) do not set its checkpoints aside
    monkeypatch.delenv(INJECT_ENV)
    params = tiny_params({"lgp": {"steps": 5, "lambda_adv": 0.0}, "train": {"checkpoint_every": 2},
                          "resources": {"train": {"mem_gb": 5}}, "eval": {"num_clips": 7}})
    train(params, ws, root, run)
    assert latest_checkpoint(root / "runs" / run).name == "step-0000005"
    assert not (root / "runs" / run / "stale").exists()
    assert assert_numbers_only(metrics)["precision"] == "fp32"


def test_cli_parses_train_and_teacher():
    import argparse

    from osv.train import distill, teacher

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    distill.register(sub)
    teacher.register(sub)
    args = parser.parse_args(["train", "--run", "stage1", "--init", "models/teacher", "--ckpt", "runs/stage1",
                              "--out", "models/stage1", "--metrics", "m.json", "--plots", "p.csv"])
    assert args.func is distill.command and args.teacher == "models/teacher"


def test_latent_stats_sees_motion():
    """sample_stats_error's motion term: a frozen clip and a moving one differ only in frame-difference std."""
    from osv.train.teacher import latent_stats

    gen = torch.Generator().manual_seed(0)
    still = torch.randn(4, 1, 2, 8, 8, generator=gen).expand(4, 6, 2, 8, 8)
    moving = still + 0.5 * torch.randn(4, 6, 2, 8, 8, generator=gen)
    assert float(latent_stats(still)[2].max()) == 0.0
    assert float(latent_stats(moving)[2].min()) > 0.5


def test_teacher_dtype_is_the_autocast_dtype_on_gpu_fp32_on_cpu():
    from osv.train.distill import teacher_dtype

    bf16 = tiny_params({"train": {"precision": "bf16"}})
    assert teacher_dtype(bf16, torch.device("cpu")) is torch.float32  # CPU runs fp32 whatever precision says
    assert teacher_dtype(bf16, torch.device("cuda")) is torch.bfloat16
    assert teacher_dtype(tiny_params({"train": {"precision": "fp32"}}), torch.device("cuda")) is torch.float32


def test_build_nets_checkpoints_student_and_vae_decoder(tmp_path):
    from osv.memory import WholeCheckpoint
    from osv.train.distill import build_nets

    params = run_params(tiny_params({"train": {"grad_checkpointing": True, "precision": "bf16"}}), "abl_e_vae_disc")
    ws = make_workspace(tmp_path, params)
    spec = {**params["train"]["runs"]["abl_e_vae_disc"], "init": "teacher"}
    nets = build_nets(params, "acd", spec, str(ws["teacher"]), str(ws["teacher"]), None, torch.device("cpu"))
    regions = [n for n, m in nets.student.named_modules() if isinstance(m, WholeCheckpoint)]
    assert any(n.endswith("attentions.0") for n in regions) and all(m.gradient_checkpointing for m in
                                                                  nets.student.modules() if isinstance(m, WholeCheckpoint))
    assert nets.disc.front_end == "vae" and any(isinstance(m, WholeCheckpoint) for m in nets.disc.vae.modules())
    teacher = nets.teacher_fn.module
    assert next(teacher.parameters()).dtype is torch.float32 and not any(p.requires_grad for p in teacher.parameters())
