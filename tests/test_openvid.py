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
# Clips named as OpenVid's Panda-70M clips, <source>_<index>_<first>to<last>.mp4; a source has clips
# in several parts, as in OpenVid. Part 0 is the test part; part 1 is served as split pieces;
# part 2 is only fetched by the tests that grow `parts`.
PARTS = {
    0: ["aaa_0_0to16.mp4", "aaa_1_20to36.mp4", "bbb_0_0to16.mp4", "ccc_0_0to16.mp4", "ccc_1_20to36.mp4",
        "ccc_2_40to56.mp4", "ddd_0_0to16.mp4", "eee_3_0to16.mp4"],
    1: ["aaa_2_40to56.mp4", "bbb_1_20to36.mp4", "ddd_1_20to36.mp4", "fff_0_0to16.mp4", "ggg_0_0to16.mp4"],
    2: ["ccc_3_60to76.mp4", "eee_4_20to36.mp4", "hhh_0_0to16.mp4", "iii_0_0to16.mp4"],
}
GOOD = sorted(PARTS[0] + PARTS[1])  # the usable captioned clips of parts [0, 1]


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
    names = [n for part in PARTS.values() for n in part]
    clips = {name: make_mp4(seed=i) for i, name in enumerate(names)}
    good = make_mp4(seed=99)
    part0 = zip_of({**{n: clips[n] for n in PARTS[0]}, "broken.mp4": good[: len(good) // 2],
                    "uncaptioned.mp4": make_mp4(seed=98)})
    part1 = zip_of({n: clips[n] for n in PARTS[1]})
    part2 = zip_of({n: clips[n] for n in PARTS[2]})
    rows = [{"video": n, "caption": f"a caption, for {n}", "frame": 16, "fps": 8} for n in [*names, "broken.mp4"]]
    rows.append({"video": "elsewhere.mp4", "caption": "in a part we do not fetch", "frame": 16, "fps": 8})
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["video", "caption", "frame", "fps"])
    writer.writeheader()
    writer.writerows(rows)
    half = len(part1) // 2
    return {CSV: out.getvalue().encode(), "OpenVid_part0.zip": part0,
            "OpenVid_part1_partaa": part1[:half], "OpenVid_part1_partab": part1[half:],
            "OpenVid_part2.zip": part2, "README.md": b"# mini OpenVid\n"}


@pytest.fixture
def hub(files, hub_env):
    with HubServer() as server:
        server.repo = server.add_repo("dataset", REPO, files)
        yield server


def make_params(endpoint: str, seed: int | None = None, **openvid) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["seed"] = params["seed"] if seed is None else seed
    params["data"]["source"] = "openvid"
    params["data"].update(frames=8, fps=7)
    params["data"]["openvid"].update({"repo_id": REPO, "revision": "main", "endpoint": endpoint, "csv": CSV,
                                      "parts": [0, 1], "test_part": 0, "test_clips": 2, "train_subset": 0,
                                      **openvid})
    return validate(params)


def manifest_rows(out: Path) -> list[dict]:
    with open(out / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def sides(out: Path) -> dict[str, str]:
    """Clip name -> train, test or held (held back with a test source), checking the split's invariants."""
    from osv.data.openvid import source_of

    report = json.loads((out / "report.json").read_text())
    side = {r["video"].split("/")[1]: r["split"] for r in manifest_rows(out)}
    held = report["split"]["held_back"]
    assert not set(held) & set(side)
    side.update(dict.fromkeys(held, "held"))
    by_source: dict[str, set[str]] = {}
    for name, s in side.items():
        by_source.setdefault(source_of(name), set()).add(s)
    assert not [src for src, s in by_source.items() if {"train", "test"} <= s]  # a source is never on both sides
    test_sources = {src for src, s in by_source.items() if "test" in s}
    assert set(report["split"]["test_sources"]) == test_sources
    assert all("train" not in by_source[source_of(n)] and source_of(n) in test_sources for n in held)
    assert {n for n, s in side.items() if s == "test"} <= set(PARTS[0])  # from the test part only
    assert report["counts"]["held_back"] == len(held) and report["counts"]["test_sources"] == len(test_sources)
    return side


def split(side: dict[str, str], which: str) -> set[str]:
    return {n for n, s in side.items() if s == which}


def seed_where(first: str) -> int:
    """A seed whose test order (over part 0's sources) starts with source `first`."""
    from osv.data.openvid import rank_key, source_of

    sources = {source_of(n) for n in [*PARTS[0], "broken.mp4"]}
    return next(seed for seed in range(1000) if min(sources, key=lambda s: rank_key(seed, s)) == first)


def test_source_of_strips_the_clip_range_suffix():
    from osv.data.openvid import source_of

    assert source_of("---_iRTHryQ_13_0to241.mp4") == "---_iRTHryQ"  # Panda-70M: index, frame range
    assert source_of("--0ETtekpw0_2_18to486.mp4") == "--0ETtekpw0"
    assert source_of("celebv___f2KtcXAxI_0.mp4") == "celebv___f2KtcXAxI"  # CelebV-HQ: index
    assert source_of("IIvwqskxtdE_0.mp4") == "IIvwqskxtdE"
    assert source_of("abc_10_20.mp4") == source_of("abc_10.5-20.25.mp4") == "abc"  # start_end, decimals
    assert source_of("abc_1_2_3to4.MP4") == "abc"
    assert source_of("x_12ab_3.mp4") == "x_12ab"  # only whole trailing number groups go
    for name in ("clip.mp4", "broken.mp4", "_12.mp4", "12.mp4", "a_b.mp4"):  # no suffix: the whole name
        assert source_of(name) == name[:-4]


def test_full_fetch_writes_clips_manifest_and_report(hub, tmp_path):
    from osv.data import MANIFEST_COLUMNS, read_manifest
    from osv.data.openvid import prepare
    from osv.video import load_clip

    out = tmp_path / "clips"
    prepare(make_params(hub.endpoint), out)
    rows = read_manifest(out / "manifest.csv")
    assert tuple(rows[0]) == MANIFEST_COLUMNS
    side = sides(out)
    assert sorted(side) == GOOD and split(side, "held")  # every usable clip is in a split or held back
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
    n_held, n_sources = len(split(side, "held")), len(report["split"]["test_sources"])
    assert report["counts"] == {"videos_in_parts": 15, "not_in_csv": 1, "checked": len(rows) + 1, "rejected": 1,
                                "train": 13 - 2 - n_held, "test": 2, "test_sources": n_sources, "held_back": n_held}
    assert report["split"]["test_part"] == 0 and "sha256('{seed}:{source}')" in report["split"]["rule"]
    assert report["commit"] == hub.repo.commit and len(report["sha256"]) == 4  # csv, zip, 2 pieces


def test_split_is_seeded_disjoint_and_subset(hub, tmp_path):
    from osv.data.openvid import prepare

    params = make_params(hub.endpoint)
    tests = {}
    for i, seed in enumerate((0, 0, 1, 2, 3)):
        out = tmp_path / f"clips{i}-{seed}"
        p = copy.deepcopy(params)
        p["seed"] = seed
        prepare(p, out)
        side = sides(out)
        assert len(split(side, "test")) == 2
        assert tests.setdefault(seed, split(side, "test")) == split(side, "test")  # same seed, same split
    assert len({frozenset(t) for t in tests.values()}) > 1  # other seeds give other splits
    p = make_params(hub.endpoint, train_subset=3)
    prepare(p, tmp_path / "subset")
    assert sum(r["split"] == "train" for r in manifest_rows(tmp_path / "subset")) == 3


def test_growing_parts_keeps_the_split(hub, tmp_path):
    """Adding parts only adds training clips and held-back siblings: no clip changes side."""
    from osv.data.openvid import prepare

    for seed in (seed_where("ccc"), seed_where("aaa")):  # test sources with siblings in parts 1 or 2
        runs = []
        for parts in ([0], [0, 1], [2, 0, 1]):  # the listed order does not matter either
            out = tmp_path / f"clips-{seed}-{len(parts)}"
            prepare(make_params(hub.endpoint, parts=parts, seed=seed), out)
            side = sides(out)
            if runs:
                assert split(side, "test") == split(runs[-1], "test")
                assert split(runs[-1], "train") <= split(side, "train")
                assert split(runs[-1], "held") <= split(side, "held")
            runs.append(side)
        assert split(runs[0], "train") < split(runs[-1], "train")  # new parts added training clips
        assert split(runs[0], "held") < split(runs[-1], "held")  # and held back the test sources' siblings


def test_boundary_source_is_cut_and_its_rest_held_back(hub, tmp_path):
    from osv.data.openvid import prepare

    seed = seed_where("ccc")  # ccc has 3 clips in the test part and 1 in part 2; test_clips = 2
    out = tmp_path / "clips"
    prepare(make_params(hub.endpoint, parts=[0, 1, 2], seed=seed), out)
    side = sides(out)
    assert split(side, "test") == {"ccc_0_0to16.mp4", "ccc_1_20to36.mp4"}
    assert split(side, "held") == {"ccc_2_40to56.mp4", "ccc_3_60to76.mp4"}


def test_rejected_test_clip_is_dropped_not_moved(hub, tmp_path):
    from osv.data.openvid import prepare, rank_key, source_of

    seed = seed_where("broken")  # the corrupt clip comes first in the test order
    out = tmp_path / "clips"
    prepare(make_params(hub.endpoint, seed=seed), out)
    side = sides(out)
    report = json.loads((out / "report.json").read_text())
    assert [(r["video"], r["checked_for"]) for r in report["rejected"]] == [("broken.mp4", "test")]
    assert "broken.mp4" not in side and len(split(side, "test")) == 2
    order = sorted({source_of(n) for n in PARTS[0]}, key=lambda s: rank_key(seed, s))
    assert order[0] in report["split"]["test_sources"]  # filled from the next source in the order


def test_impossible_splits_are_refused(hub, tmp_path):
    from osv.data.openvid import prepare

    with pytest.raises(ValueError, match=r"data.openvid.test_part \(2\) must be one of data.openvid.parts \[0, 1\]"):
        prepare(make_params(hub.endpoint, test_part=2), tmp_path / "a")  # the params gate, before any work
    assert not [p for m, p, _ in hub.log if m == "GET" and ".zip" in p]  # refused before any download
    with pytest.raises(ValueError, match=r"test part 0 \(OpenVid_part0.zip\) has 8 usable captioned clips "
                                         r"\(1 rejected\), fewer than data.openvid.test_clips=9"):
        prepare(make_params(hub.endpoint, test_clips=9), tmp_path / "b")
    with pytest.raises(ValueError, match=r"no usable training clip in parts \[0\] besides the 8 test clips"):
        prepare(make_params(hub.endpoint, parts=[0], test_clips=8), tmp_path / "c")
    assert not any((tmp_path / d).exists() for d in "abc")


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
    assert len(sides(tmp_path / "clips")) == len(GOOD)


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
