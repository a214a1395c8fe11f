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
    if method.startswith("teacher"):  # guidance absorption: a trained student's only
        assert "absorption" not in meta
    else:
        terms = meta["absorption_per_clip"]
        assert len(terms["numerator"]) == len(terms["denominator"]) == 3 and min(terms["denominator"]) > 0
        assert meta["absorption"] == pytest.approx(sum(terms["numerator"]) / sum(terms["denominator"]))
        assert meta["absorption_sums"]["denominator"] == pytest.approx(sum(terms["denominator"]))


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


def test_every_sampler_starts_from_the_same_noise():
    """x_T = sigma_max eps, eps the first draw of the batch's generator, for every method (the teacher
    with init_noise="edm"): what the teacher-ODE match and the absorption probe rely on."""
    from osv.conditioning import SVDConditioning
    from osv.eval.generate import sample, sigma_max_input
    from osv.sde import Denoiser

    params = tiny_params()
    shape = (2, params["data"]["frames"], 4, 4, 4)
    g = torch.Generator().manual_seed(5)
    cond = SVDConditioning(torch.randn(2, 1, 64, generator=g), torch.randn(2, 4, 4, 4, generator=g),
                           torch.randn(2, 3, generator=g))
    want, sigma = sigma_max_input(shape, torch.Generator().manual_seed(11), params, "cpu")
    assert float(sigma) == params["sde"]["sigma_max"]
    for name in ("teacher_25", "teacher_1", "teacher_1_nocfg", "osv_1", "osv_4", "osv_tts", "abl_f_cfg3p0"):
        seen = []
        den = Denoiser.from_fn(lambda x, s, c, seen=seen: seen.append(x[: shape[0]].clone()) or torch.zeros_like(x))
        sample(params["eval"]["methods"][name], den, cond, shape, torch.Generator().manual_seed(11), params)
        assert torch.equal(seen[0], want), name


def test_guidance_absorption_is_0_for_the_untrained_student_and_1_for_the_guided_teacher(workspace):
    """The share of the teacher's CFG shift that f_theta reproduces at sigma_max: 0 for the teacher plus a
    zero LoRA (what training starts from), 1 for a student whose network is the teacher's guided F
    (and 0.5 for the teacher guided with half the ramp's excess over 1)."""
    from osv.conditioning import from_batch
    from osv.eval.generate import guidance_absorption, sigma_max_input
    from osv.latents import LatentDataset
    from osv.models import load_unet
    from osv.samplers import guidance_ramp
    from osv.sde import Denoiser
    from osv.student import make_student

    params, ws, _, _ = workspace
    res, frames = params["data"]["resolution"], params["data"]["frames"]
    data = LatentDataset(ws["latents"], "test", res["width"], res["height"])
    items = [data[i] for i in range(2)]
    cond = from_batch({k: torch.stack([it[k] for it in items]) for k in ("cond_latents", "image_embeds")}, params)
    x, sigma = sigma_max_input((2, *items[0]["latents"].shape), torch.Generator().manual_seed(0), params, "cpu")
    teacher = Denoiser(load_unet(ws["teacher"]).eval())
    w = guidance_ramp(params["acd"]["cfg"]["max"], frames, params["acd"]["cfg"]["min"])
    lora = make_student(load_unet(ws["teacher"]), params["student"]["lora_rank"], params["student"]["lora_targets"])
    cases = {"zero LoRA": (Denoiser(lora.eval()), 0.0),
             "guided F": (Denoiser.from_fn(lambda x_, s, c: teacher.guided(x_, s, c, w)), 1.0),
             "half the guidance": (Denoiser.from_fn(lambda x_, s, c: teacher.guided(x_, s, c, 1 + (w - 1) / 2)), 0.5)}
    for name, (student, want) in cases.items():
        with torch.no_grad():
            num, den = guidance_absorption(student, teacher, x, sigma, cond, w)
        assert num.shape == den.shape == (2,) and den.min() > 0, name
        assert float(num.sum() / den.sum()) == pytest.approx(want, abs=1e-4), name


def test_generate_with_the_teacher_as_student_absorbs_nothing(workspace):
    """osv generate's probe on a student method whose model is the teacher itself: absorption 0. And
    its 1-step consistency samples are the unguided 1-step teacher's (f(x, sigma_max) = D = one Euler
    step to 0) up to float rounding: same noise, same first frame, end to end."""
    from osv.eval.psnr import psnr

    params, ws, _, root = workspace
    out = root / "samples" / "teacher_as_student"
    meta = generate(params, "osv_1", str(ws["teacher"]), str(ws["teacher"]), str(ws["latents"]), str(out))
    assert meta["absorption"] == pytest.approx(0.0, abs=1e-6) and meta["absorption_sums"]["denominator"] > 0
    ref = root / "samples" / "teacher_1_nocfg"
    generate(params, "teacher_1_nocfg", str(ws["teacher"]), str(ws["teacher"]), str(ws["latents"]), str(ref))
    for a, b in zip(sorted(out.glob("clip-*.mp4")), sorted(ref.glob("clip-*.mp4")), strict=True):
        assert psnr(read_frames(a)[0], read_frames(b)[0]) > 40, a.name


def test_parts_give_the_same_samples_and_a_failed_batch_is_all_that_reruns(workspace, monkeypatch):
    """Two jobs (as the generate_part rules run them) write what one job writes; a job that dies at
    batch 1 keeps batch 0, and its rerun samples batch 1 only."""
    from osv.eval import generate as gen
    from osv.numerics import INJECT_ENV, NonFiniteError

    params, ws, student, root = workspace
    args = (params, "osv_tts", str(ws["teacher"]), str(student), str(ws["latents"]))
    whole = generate(*args, str(root / "fan" / "whole"))
    out = root / "fan" / "split"
    gen.generate_part(*args, str(out), 1, 2)
    with pytest.raises(FileNotFoundError, match=r"part-000-of-002.json: generate part 0 of 2 has not finished "
                                                r"\(run `osv generate --method osv_tts --part 0`\)"):
        gen.gather(params, "osv_tts", str(student), str(out), 2)
    gen.generate_part(*args, str(out), 0, 2)
    split = gen.gather(params, "osv_tts", str(student), str(out), 2)
    same = ("clip_ids", "nfe", "absorption_per_clip", "unet_sha256", "clips")
    assert {k: split[k] for k in same} == {k: whole[k] for k in same} and split["jobs"] == 2
    for clip in sorted((root / "fan" / "whole").glob("clip-*.mp4")):
        assert np.array_equal(read_frames(clip)[0], read_frames(out / clip.name)[0]), clip.name

    resumed = root / "fan" / "resumed"
    monkeypatch.setenv(INJECT_ENV, "generate:1")
    with pytest.raises(NonFiniteError):
        gen.generate_part(*args, str(resumed), 0, 1)
    monkeypatch.delenv(INJECT_ENV)
    assert gen.generate_part(*args, str(resumed), 0, 1) == {"part": 0, "jobs": 1, "sampled": 1, "reused": 1,
                                                             "device": "cpu"}
    assert gen.gather(params, "osv_tts", str(student), str(resumed), 1)["clip_ids"] == whole["clip_ids"]
