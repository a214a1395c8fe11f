"""`osv weights`: the config path (small random models) and the hub path against a local hub."""

from __future__ import annotations

import argparse
import hashlib
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
    inception = io.BytesIO()  # a small state dict in place of pytorch-fid's 95 MB one
    torch.save({"fc.weight": torch.arange(6.0).reshape(3, 2), "fc.bias": torch.zeros(3)}, inception)
    return {"svd": svd, "dinov2": folder_files(tmp / "dinov2"), "i3d": buf.getvalue(), "inception": inception.getvalue()}


@pytest.fixture
def hub(served, hub_env, monkeypatch):
    with HubServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        server.svd = server.add_repo("model", "test/svd-small", served["svd"])
        server.dino = server.add_repo("model", "test/dinov2-small", served["dinov2"])
        server.i3d_url = server.add_url("i3d_torchscript.pt", served["i3d"])
        server.inception_sha = hashlib.sha256(served["inception"]).hexdigest()
        server.inception_url = server.add_url("pt_inception-2015-12-05-6726825d.pth", served["inception"])
        yield server


def hub_params(hub, sha256: str | None, inception_sha256: str | None = "served") -> dict:
    params = base_params()
    inception_sha256 = hub.inception_sha if inception_sha256 == "served" else inception_sha256
    params["weights"].update(source="hub", teacher={"repo_id": "test/svd-small", "revision": hub.svd.commit},
                             dinov2={"repo_id": "test/dinov2-small", "revision": hub.dino.commit},
                             i3d={"url": hub.i3d_url, "sha256": sha256},
                             inception={"url": hub.inception_url, "sha256": inception_sha256})
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
    assert info["parts"]["inception"] == {"url": hub.inception_url, "file": "inception/pt_inception.pth",
                                          "sha256": hub.inception_sha, "sha256_checked": True,
                                          "sha256_prefix_checked": None}
    assert (out / "inception" / "pt_inception.pth").read_bytes() == served["inception"]


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


def test_hub_source_refuses_wrong_inception_hash_before_writing(hub, tmp_path):
    """A pinned FID Inception hash that the download does not have: a clear error, no models/base."""
    from osv.hub import DownloadError, download_root

    out = tmp_path / "base"
    with pytest.raises(DownloadError) as err:
        run_weights(hub_params(hub, None, "b" * 64), tmp_path, out)
    msg = str(err.value)
    assert "pt_inception-2015-12-05-6726825d.pth" in msg and "(pt_inception.pth): sha256 mismatch" in msg
    assert f"expected {'b' * 64}, got {hub.inception_sha}; removed the download" in msg
    assert not out.exists() and not list(tmp_path.glob(".base.*"))  # nothing in place, no temporary folder
    left = [f.name for f in (download_root() / "urls").rglob("pt_inception.pth*") if f.suffix != ".lock"]
    assert left == []  # the refused download is gone from the cache too
    assert run_weights(hub_params(hub, None), tmp_path, out) == 0  # the right hash fetches it again


def test_inception_hash_prefix_from_the_file_name(hub, served, tmp_path):
    """weights.inception.sha256 null: torch hub's `-<hex>.pth` suffix must start the SHA-256."""
    from osv.hub import DownloadError
    from osv.weights import fetch_inception

    sha = hub.inception_sha
    good = hub.add_url(f"pt_inception-2015-12-05-{sha[:8]}.pth", served["inception"])
    rec = fetch_inception({"url": good, "sha256": None}, tmp_path / "a")
    assert rec["sha256"] == sha and rec["sha256_prefix_checked"] == sha[:8] and rec["sha256_checked"] is False
    wrong = "0" * 8 if not sha.startswith("0" * 8) else "1" * 8
    bad = hub.add_url(f"pt_inception-2015-12-05-{wrong}.pth", served["inception"])
    with pytest.raises(DownloadError, match=f"expected a hash starting with {wrong} .*got {sha}"):
        fetch_inception({"url": bad, "sha256": None}, tmp_path / "b")
    assert not (tmp_path / "b").exists()
    plain = hub.add_url("inception_weights.pth", served["inception"])  # no hash in the name: recorded only
    rec = fetch_inception({"url": plain, "sha256": None}, tmp_path / "c")
    assert rec["sha256"] == sha and rec["sha256_prefix_checked"] is None


def test_inception_file_not_a_state_dict_is_refused(hub, tmp_path):
    from osv.weights import fetch_inception

    url = hub.add_url("page.pth", b"<html>sign in</html>")
    with pytest.raises(ValueError, match="is not a torch state dict"):
        fetch_inception({"url": url, "sha256": None}, tmp_path / "x")


def test_fvd_reads_the_inception_file_where_weights_writes_it(tmp_path):
    import osv.eval.features as features
    import osv.weights as weights

    assert features.INCEPTION_FILE == weights.INCEPTION_FILE
    assert features.inception_weights_path(tmp_path) == tmp_path / weights.INCEPTION_FILE


def test_gated_repository_error_says_how_to_get_access(hub_env, monkeypatch):
    """A 401 from the hub (SVD img2vid is gated) names the licence page and the token settings."""
    import importlib

    from huggingface_hub.errors import GatedRepoError, Response

    http = importlib.import_module(Response.__module__.split(".")[0])  # huggingface_hub's HTTP client (httpx2)

    from osv.hub import DownloadError, resolve_commit

    def refuse(url, **kwargs):
        response = http.Response(401, request=http.Request("HEAD", url))
        raise GatedRepoError("Access to model stabilityai/stable-video-diffusion-img2vid is restricted.",
                             response=response)

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_hf_file_metadata", refuse)
    with pytest.raises(DownloadError) as err:
        resolve_commit("stabilityai/stable-video-diffusion-img2vid", "model", "a" * 40, None, "model_index.json")
    msg = str(err.value)
    assert "refused access (HTTP 401)" in msg
    assert "accept its licence on http://127.0.0.1:9/stabilityai/stable-video-diffusion-img2vid" in msg
    assert "hf auth login" in msg and "HF_TOKEN" in msg


# ----------------------------------------------------------------------------- weights.architecture svd
# The real build (paper-smoke scale) writes ~9 GB and takes minutes (workflow/scales/paper-smoke.yaml);
# these tests check what it would build on the meta device, and its weights.json with small stand-ins.

# stabilityai/stable-video-diffusion-img2vid image_encoder/config.json, the architecture keys
SVD_IMAGE_ENCODER_PUBLISHED = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                               "num_attention_heads": 16, "patch_size": 14, "image_size": 224, "projection_dim": 1024,
                               "hidden_act": "gelu", "layer_norm_eps": 1e-5, "num_channels": 3}
# parameters of SVD img2vid's UNet (1.52B), CLIP ViT-H/14 image encoder (632M), VAE and facebook/dinov2-small
SVD_PARAMETERS = {"unet": 1_524_623_082, "image_encoder": 632_076_800, "vae": 97_742_847, "dinov2": 22_056_576}


def smoke_params() -> dict:
    return yaml.safe_load((ROOT / "workflow/scales/paper-smoke.yaml").read_text())


def test_small_architecture_writes_what_the_pipeline_save_wrote(tmp_path):
    """weights.architecture small, written part by part, is byte for byte the folder that
    build_small_pipeline().save_pretrained + build_small_dinov2().save_pretrained wrote before."""
    from osv.models import build_small_dinov2, build_small_pipeline

    params = base_params()
    assert params["weights"]["architecture"] == "small"
    seed, frames = params["weights"]["config_seed"], params["data"]["frames"]
    old = tmp_path / "old"
    build_small_pipeline(seed, num_frames=frames).save_pretrained(str(old))
    build_small_dinov2(seed + 3).save_pretrained(str(old / "dinov2"))
    assert run_weights(params, tmp_path, tmp_path / "new") == 0
    new = folder_files(tmp_path / "new")
    assert new.pop("weights.json") and new == folder_files(old)


def test_svd_architecture_is_the_published_one():
    """The parts weights.architecture svd builds (here on the meta device) have SVD img2vid's and
    DINOv2-small's published configs and parameter counts."""
    from osv import models

    build = models.BUILDERS["svd"]
    with torch.device("meta"):
        parts = {"unet": build["unet"](2, 2), "image_encoder": build["image_encoder"](1), "vae": build["vae"](0),
                 "dinov2": build["dinov2"](3)}
    unet = dict(parts["unet"].config)
    assert {k: unet[k] for k in models.SVD_UNET_PUBLISHED} == models.SVD_UNET_PUBLISHED
    assert unet["num_frames"] == 2 and unet["sample_size"] == 96
    enc = parts["image_encoder"].config.to_dict()
    assert {k: enc[k] for k in SVD_IMAGE_ENCODER_PUBLISHED} == SVD_IMAGE_ENCODER_PUBLISHED
    assert {k: parts["vae"].config[k] for k in models.SVD_VAE} == {k: v for k, v in models.SVD_VAE.items()}
    dino = parts["dinov2"].config.to_dict()
    assert {k: dino[k] for k in models.DINOV2_SMALL} == models.DINOV2_SMALL
    assert {k: models.count_parameters(m) for k, m in parts.items()} == SVD_PARAMETERS
    # the UNet's cross-attention reads the CLIP projection, as in SVD
    assert unet["cross_attention_dim"] == enc["projection_dim"] == 1024
    fe = models.build_feature_extractor().to_dict()
    assert (fe["crop_size"], fe["size"], fe["resample"]) == ({"height": 224, "width": 224}, {"shortest_edge": 224}, 3)
    assert list(fe["image_mean"]) == [0.48145466, 0.4578275, 0.40821073]


def test_svd_architecture_weights_json_says_random_init(tmp_path, monkeypatch):
    """The svd route's folder and weights.json, with the small parts standing in for the big ones."""
    from diffusers import StableVideoDiffusionPipeline

    from osv import models
    from osv.hub import sha256_file

    monkeypatch.setitem(models.BUILDERS, "svd", models.BUILDERS["small"])
    params = smoke_params()
    assert params["weights"]["source"] == "config" and params["weights"]["architecture"] == "svd"
    out = tmp_path / "base"
    assert run_weights(params, tmp_path, out) == 0
    StableVideoDiffusionPipeline.from_pretrained(str(out))
    info = json.loads((out / "weights.json").read_text())
    phrase = "SVD img2vid architecture, random init (NOT the real SVD/DINOv2 weights)"
    assert info["source"] == "config" and info["architecture"] == "svd" and info["note"].startswith(phrase)
    assert info["num_frames"] == params["data"]["frames"]
    seeds = {"vae": 0, "image_encoder": 1, "unet": 2, "dinov2": 3}
    for part, seed in seeds.items():
        rec = info["parts"][part]
        assert rec["description"].startswith(phrase) and rec["description"].endswith(f"seed {seed}")
        assert rec["config"].startswith("osv.models.") and rec["init"] == "random" and rec["parameters"] > 0
        for rel, f in rec["files"].items():
            assert f["sha256"] == sha256_file(out / rel)


def test_architecture_rejects_a_bad_value():
    params = base_params()
    params["weights"]["architecture"] = "svd-xt"
    with pytest.raises(ParamsError, match=r"weights\.architecture: 'svd-xt' is not one of \['small', 'svd'\]"):
        validate(params)
    del params["weights"]["architecture"]
    with pytest.raises(ParamsError, match=r"weights: 'architecture' is a required property"):
        validate(params)


def test_paper_smoke_scale_validates_and_taps_dinov2_small():
    params = load_params(ROOT / "workflow/scales/paper-smoke.yaml")
    assert params["scale"] == "paper-smoke" and params["data"]["source"] == "embedded"
    assert params["disc"]["layers"] == [2, 5, 8, 11]  # DINOv2-small's 12 blocks, as at paper scale
    assert set(params["train"]["runs"]) == {"stage1", "stage2"}
    bad = smoke_params()
    bad["disc"]["layers"] = [12]
    with pytest.raises(ParamsError, match=r"disc.layers\[0\] \(12\) must be below 12, .*DINOv2-small"):
        validate(bad)
    bad["weights"]["architecture"] = "small"  # the small backbone has 4 blocks
    with pytest.raises(ParamsError, match=r"must be below 4, .*osv/configs/small_dinov2.json"):
        validate(bad)
