"""osv generate and the OSVPipeline entry point on small real models: determinism, NFE, outputs."""

import json

import numpy as np
import pytest
import torch
from test_train import make_workspace, tiny_params

from osv.eval.generate import generate
from osv.models import build_small_unet
from osv.pipeline import OSVPipeline
from osv.train.export import sampler_config
from osv.video import read_frames


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    params = tiny_params({"eval": {"num_clips": 3, "batch_size": 2}})
    ws = make_workspace(root, params)
    student = root / "models" / "student"
    build_small_unet(7, params["data"]["frames"]).save_pretrained(str(student / "unet"))
    (student / "sampler.json").write_text(json.dumps(sampler_config(params)))
    return params, ws, student, root


@pytest.mark.parametrize("method,nfe", [("teacher_2", 4), ("osv_1", 1), ("osv_tts", 2), ("osv_4", 4),
                                        ("abl_f_cfg1p5", 2)])
def test_generate_counts_nfe_and_writes_videos(workspace, method, nfe):
    params, ws, student, root = workspace
    model = ws["teacher"] if method.startswith("teacher") else student
    out = root / "samples" / method
    meta = generate(params, method, str(ws["teacher"]), str(model), str(ws["latents"]), str(out))
    assert meta["nfe"] == nfe and meta["clips"] == 3 and len(meta["clip_ids"]) == 3
    assert json.loads((out / "meta.json").read_text())["nfe"] == nfe
    clips = sorted(out.glob("clip-*.mp4"))
    assert len(clips) == 3 and (out / "preview.gif").exists() and (out / "contact.png").exists()
    frames, _ = read_frames(clips[0])
    res = params["data"]["resolution"]
    assert frames.shape == (params["data"]["frames"], res["height"], res["width"], 3)


def test_generate_is_deterministic(workspace):
    params, ws, student, root = workspace
    runs = []
    for name in ("a", "b"):
        out = root / "det" / name
        generate(params, "osv_tts", str(ws["teacher"]), str(student), str(ws["latents"]), str(out))
        runs.append([read_frames(p)[0] for p in sorted(out.glob("clip-*.mp4"))])
    assert all(np.array_equal(x, y) for x, y in zip(*runs))


def test_pipeline_entry_point(workspace):
    params, ws, student, root = workspace
    pipe = OSVPipeline.from_pretrained(student, teacher=ws["teacher"])
    image = (torch.rand(64, 128, 3) * 255).byte().numpy()
    from PIL import Image

    a = pipe(Image.fromarray(image), seed=3)
    b = pipe(Image.fromarray(image), seed=3)
    res = params["data"]["resolution"]
    assert a.nfe == 2 and a.frames.shape == (params["data"]["frames"], res["height"], res["width"], 3)
    assert np.array_equal(a.frames, b.frames)
    assert pipe(Image.fromarray(image), sampler="consistency", steps=2).nfe == 2
    pipe.save_mp4(a.frames, root / "video.mp4")
    assert read_frames(root / "video.mp4")[0].shape == a.frames.shape


def test_nan_latents_stop_generate_without_samples(workspace, monkeypatch):
    from osv.numerics import INJECT_ENV, NonFiniteError

    params, ws, student, root = workspace
    out = root / "samples" / "nan"
    monkeypatch.setenv(INJECT_ENV, "generate:1")  # the second of two batches (3 clips, batch 2)
    with pytest.raises(NonFiniteError, match=r"^osv generate: non-finite latents at step 1 \(latents=nan\)"):
        generate(params, "osv_1", str(ws["teacher"]), str(student), str(ws["latents"]), str(out))
    assert not out.exists() and not list(out.parent.glob(".nan.*"))
