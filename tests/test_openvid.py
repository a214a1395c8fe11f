"""OpenVid-1M fetch: the real download code against a local hub (tests/hubserver.py) serving real mp4s."""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from hubserver import HubServer  # noqa: E402

from osv.params import validate  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
REPO = "test/OpenVid-mini"
CSV = "data/train/OpenVid-1M.csv"
GOOD = [f"clip{i}.mp4" for i in range(7)]  # 4 in part 0, 3 in part 1 (served as split pieces)


def make_mp4(frames: int = 16, fps: int = 8, seed: int = 0) -> bytes:
    import av

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        base = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        for t in range(frames):
            img = np.roll(base, 2 * t, axis=1)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def zip_of(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(f"video/{name}", data)  # members sit in a folder, as in OpenVid's zips
    return buf.getvalue()


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    clips = {name: make_mp4(seed=i) for i, name in enumerate(GOOD)}
    good = make_mp4(seed=99)
    part0 = zip_of({**{n: clips[n] for n in GOOD[:4]}, "broken.mp4": good[: len(good) // 2],
                    "uncaptioned.mp4": make_mp4(seed=98)})
    part1 = zip_of({n: clips[n] for n in GOOD[4:]})
    rows = [{"video": n, "caption": f"a caption, for {n}", "frame": 16, "fps": 8} for n in [*GOOD, "broken.mp4"]]
    rows.append({"video": "elsewhere.mp4", "caption": "in a part we do not fetch", "frame": 16, "fps": 8})
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["video", "caption", "frame", "fps"])
    writer.writeheader()
    writer.writerows(rows)
    half = len(part1) // 2
    return {CSV: out.getvalue().encode(), "OpenVid_part0.zip": part0,
            "OpenVid_part1_partaa": part1[:half], "OpenVid_part1_partab": part1[half:],
            "README.md": b"# mini OpenVid\n"}


@pytest.fixture
def hub(files, hub_env):
    with HubServer() as server:
        server.repo = server.add_repo("dataset", REPO, files)
        yield server


def make_params(endpoint: str, **openvid) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["source"] = "openvid"
    params["data"].update(frames=8, fps=7)
    params["data"]["openvid"].update({"repo_id": REPO, "revision": "main", "endpoint": endpoint, "csv": CSV,
                                      "parts": [0, 1], "test_clips": 2, "train_subset": 0, **openvid})
    return validate(params)


def manifest_rows(out: Path) -> list[dict]:
    with open(out / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_full_fetch_writes_clips_manifest_and_report(hub, tmp_path):
    from osv.data import MANIFEST_COLUMNS, read_manifest
    from osv.data.openvid import prepare
    from osv.video import load_clip

    out = tmp_path / "clips"
    prepare(make_params(hub.endpoint), out)
    rows = read_manifest(out / "manifest.csv")
    assert tuple(rows[0]) == MANIFEST_COLUMNS
    assert sorted(Path(r["video"]).name for r in rows) == GOOD
    assert sum(r["split"] == "test" for r in rows) == 2
    for r in rows:
        assert (out / r["video"]).is_file() and r["video"].startswith(r["split"] + "/")
        assert r["caption"] == f"a caption, for {Path(r['video']).name}"
        assert (r["frames"], r["fps"], r["width"], r["height"]) == (8, 7.0, 128, 64)  # the clip to cut
        assert r["start_sec"] == 0.0 and r["end_sec"] == pytest.approx(8 / 7)
        assert r["source"] in ("openvid:OpenVid_part0.zip", "openvid:OpenVid_part1.zip")
    clip = load_clip(out / rows[0]["video"], 8, 7, 128, 64, start_sec=0.0)  # the loader cuts what a row says
    assert clip.shape == (8, 64, 128, 3)
    report = json.loads((out / "report.json").read_text())
    assert report["native"][rows[0]["video"]] == {"frames": 16, "fps": 8.0, "width": 64, "height": 48, "end_sec": 2.0}
    assert [(x["video"], x["reason"].split(":")[0]) for x in report["rejected"]] == [("broken.mp4", "undecodable")]
    assert report["counts"] == {"videos_in_parts": 9, "not_in_csv": 1, "checked": 8, "rejected": 1,
                                "train": 5, "test": 2}
    assert report["commit"] == hub.repo.commit and len(report["sha256"]) == 4  # csv, zip, 2 pieces


def test_split_is_seeded_disjoint_and_subset(hub, tmp_path):
    from osv.data.openvid import prepare

    params = make_params(hub.endpoint)
    tests = {}
    for seed in (0, 0, 1, 2, 3):
        out = tmp_path / f"clips{len(tests)}-{seed}"
        p = copy.deepcopy(params)
        p["seed"] = seed
        prepare(p, out)
        rows = manifest_rows(out)
        test, train = ({r["video"].split("/")[1] for r in rows if r["split"] == s} for s in ("test", "train"))
        assert not test & train and len(test) == 2
        assert tests.setdefault(seed, test) == test  # the same seed gives the same split
    assert len({frozenset(t) for t in tests.values()}) > 1  # other seeds give other splits
    p = make_params(hub.endpoint, train_subset=3)
    prepare(p, tmp_path / "subset")
    assert sum(r["split"] == "train" for r in manifest_rows(tmp_path / "subset")) == 3


def test_dropped_connection_resumes_with_range(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from osv.data.openvid import prepare

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 4096)  # small chunks: a drop keeps what arrived
    size = len(hub.repo.files["OpenVid_part0.zip"])
    hub.drop_once("OpenVid_part0.zip", size // 2)
    prepare(make_params(hub.endpoint), tmp_path / "clips")
    gets = [rng for m, p, rng in hub.log if m == "GET" and p.endswith("OpenVid_part0.zip")]
    assert len(gets) == 2 and gets[0] is None and gets[1].startswith("bytes=")
    assert 0 < int(gets[1][6:].rstrip("-")) <= size // 2
    assert len(manifest_rows(tmp_path / "clips")) == 7


def test_partial_incomplete_file_is_resumed(hub, tmp_path):
    from osv.data.openvid import fetch
    from osv.hub import repo_cache, sha256_file

    data = hub.repo.files["OpenVid_part0.zip"]
    partial = repo_cache("dataset", REPO, hub.repo.commit) / "OpenVid_part0.zip.incomplete"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(data[:1000])
    path, digest = fetch(REPO, hub.repo.commit, hub.endpoint, "OpenVid_part0.zip")
    assert path.read_bytes() == data and digest == sha256_file(path) and not partial.exists()
    assert [rng for m, p, rng in hub.log if m == "GET" and "part0" in p] == ["bytes=1000-"]


def test_content_not_matching_advertised_sha256_is_refused(hub, tmp_path):
    from osv.data.openvid import prepare
    from osv.hub import DownloadError, repo_cache

    hub.repo.advertised["OpenVid_part0.zip"] = {"sha256": "0" * 64}
    with pytest.raises(DownloadError, match=r"OpenVid_part0.zip: sha256 mismatch: expected 0{64}, got [0-9a-f]{64}"):
        prepare(make_params(hub.endpoint), tmp_path / "clips")
    assert not (tmp_path / "clips").exists()
    cache = repo_cache("dataset", REPO, hub.repo.commit)
    assert not list(cache.glob("OpenVid_part0.zip*[!k]"))  # neither the file nor a partial (only the lock)
    assert os.environ["HF_HOME"].startswith(str(tmp_path))


def test_content_not_matching_advertised_size_is_refused(hub, tmp_path):
    from osv.data.openvid import fetch
    from osv.hub import DownloadError

    size = len(hub.repo.files["OpenVid_part0.zip"])
    hub.repo.advertised["OpenVid_part0.zip"] = {"size": size + 10}
    with pytest.raises(DownloadError, match=f"size mismatch: the hub reports {size + 10} bytes, got {size}"):
        fetch(REPO, hub.repo.commit, hub.endpoint, "OpenVid_part0.zip")
