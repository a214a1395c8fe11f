"""`osv weights`: the config path (small random models) and the hub path against a local hub."""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from hubserver import HubServer  # noqa: E402

from osv.params import ParamsError, load_params, validate  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def run_weights(params: dict, tmp_path: Path, out: Path) -> int:
    import osv.weights

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    parser = argparse.ArgumentParser()
    osv.weights.register(parser.add_subparsers())
    args = parser.parse_args(["weights", "--params", str(path), "--out", str(out)])
    return args.func(args)


def base_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def folder_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_config_source_builds_loadable_random_models(tmp_path):
    from diffusers import StableVideoDiffusionPipeline
    from transformers import Dinov2Model

    from osv.hub import sha256_file

    params = base_params()
    assert params["weights"]["source"] == "config"
    out = tmp_path / "models" / "base"
    assert run_weights(params, tmp_path, out) == 0
    pipe = StableVideoDiffusionPipeline.from_pretrained(str(out))
    assert pipe.unet.config.num_frames == params["data"]["frames"]
    Dinov2Model.from_pretrained(str(out / "dinov2"))
    info = json.loads((out / "weights.json").read_text())
    assert info["source"] == "config" and "NOT the real SVD/DINOv2 weights" in info["note"]
    for part, config in (("unet", "unet"), ("vae", "vae"), ("image_encoder", "clip"), ("dinov2", "dinov2")):
        rec = info["parts"][part]
        assert rec["description"].startswith(f"built from osv/configs/small_{config}.json, seed ")
        assert "random init (NOT the real SVD/DINOv2 weights)" in rec["description"]
        assert rec["parameters"] > 0 and rec["files"]
        for rel, f in rec["files"].items():
            assert f["sha256"] == sha256_file(out / rel)
    assert info["parts"]["unet"]["parameters"] == sum(p.numel() for p in pipe.unet.parameters())
    assert not list(out.parent.glob(".base.*"))  # the temporary folder is gone


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Small SVD pipeline and DINOv2 folders as hub repos, plus a TorchScript module as a URL."""
    from transformers import BitImageProcessor

    from osv.models import build_small_dinov2, build_small_pipeline

    tmp = tmp_path_factory.mktemp("served")
    build_small_pipeline(1, num_frames=8).save_pretrained(str(tmp / "svd"))
    build_small_dinov2(2).save_pretrained(str(tmp / "dinov2"))
    BitImageProcessor(crop_size={"height": 224, "width": 224}, size={"shortest_edge": 256}).save_pretrained(
        str(tmp / "dinov2"))  # as facebook/dinov2-small ships it
    svd = folder_files(tmp / "svd")
    svd["svd.safetensors"] = b"original-format checkpoint we do not want"  # must not be fetched
    svd["unet/diffusion_pytorch_model.fp16.safetensors"] = b"fp16 variant we do not use"
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(torch.nn.Linear(3, 2)), buf)
    return {"svd": svd, "dinov2": folder_files(tmp / "dinov2"), "i3d": buf.getvalue()}


@pytest.fixture
def hub(served, hub_env, monkeypatch):
    with HubServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        server.svd = server.add_repo("model", "test/svd-small", served["svd"])
        server.dino = server.add_repo("model", "test/dinov2-small", served["dinov2"])
        server.i3d_url = server.add_url("i3d_torchscript.pt", served["i3d"])
        yield server


def hub_params(hub, sha256: str | None) -> dict:
    params = base_params()
    params["weights"].update(source="hub", teacher={"repo_id": "test/svd-small", "revision": hub.svd.commit},
                             dinov2={"repo_id": "test/dinov2-small", "revision": hub.dino.commit},
                             i3d={"url": hub.i3d_url, "sha256": sha256})
    return validate(params)


def test_hub_source_downloads_pinned_verified_files(hub, served, tmp_path):
    import hashlib

    from diffusers import StableVideoDiffusionPipeline
    from transformers import Dinov2Model

    i3d_sha = hashlib.sha256(served["i3d"]).hexdigest()
    out = tmp_path / "base"
    assert run_weights(hub_params(hub, i3d_sha), tmp_path, out) == 0
    StableVideoDiffusionPipeline.from_pretrained(str(out))
    Dinov2Model.from_pretrained(str(out / "dinov2"))
    torch.jit.load(str(out / "i3d" / "i3d_torchscript.pt"))
    assert not (out / "svd.safetensors").exists() and not (out / "unet/diffusion_pytorch_model.fp16.safetensors").exists()
    info = json.loads((out / "weights.json").read_text())
    teacher = info["parts"]["teacher"]
    assert teacher["commit"] == hub.svd.commit and teacher["parameters"] > 0
    for rel, rec in teacher["files"].items():
        assert rec["sha256"] == hashlib.sha256(served["svd"][rel]).hexdigest()
    assert set(info["parts"]["dinov2"]["files"]) == {"config.json", "model.safetensors", "preprocessor_config.json"}
    assert info["parts"]["i3d"] == {"url": hub.i3d_url, "sha256": i3d_sha, "sha256_checked": True}


def test_hub_source_refuses_wrong_i3d_hash_and_unpinned_revision(hub, served, tmp_path):
    from osv.hub import DownloadError

    with pytest.raises(DownloadError, match=f"expected {'a' * 64}, got [0-9a-f]{{64}}"):
        run_weights(hub_params(hub, "a" * 64), tmp_path, tmp_path / "base")
    assert not (tmp_path / "base").exists()
    params = hub_params(hub, None)
    params["weights"]["teacher"]["revision"] = "main"
    with pytest.raises(ParamsError, match="weights.teacher.revision: 'main' is not a 40-hex commit"):
        run_weights(params, tmp_path, tmp_path / "base")


def test_hub_file_not_matching_hub_hash_is_refused(hub, tmp_path):
    from osv.hub import DownloadError

    hub.svd.advertised["unet/diffusion_pytorch_model.safetensors"] = {"sha256": "f" * 64}
    with pytest.raises(DownloadError, match="unet/diffusion_pytorch_model.safetensors: sha256 mismatch"):
        run_weights(hub_params(hub, None), tmp_path, tmp_path / "base")


def test_paper_scale_validates():
    params = load_params(ROOT / "workflow/scales/paper.yaml")
    assert params["scale"] == "paper" and params["data"]["source"] == "openvid"
    assert (params["data"]["frames"], params["data"]["fps"]) == (14, 7)
    assert params["data"]["resolution"] == {"width": 1024, "height": 576}
    assert params["weights"]["source"] == "hub"
    assert params["train"]["runs"].keys() == base_params()["train"]["runs"].keys()
    assert params["eval"]["methods"] == base_params()["eval"]["methods"]
    stage2 = load_params(ROOT / "workflow/scales/paper.yaml", run="stage2")
    assert stage2["resources"]["train"]["gpus"] == 2 and params["resources"]["train"]["gpus"] == 8
