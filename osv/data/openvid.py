"""OpenVid-1M, the paper-scale data: fetch the caption CSV and zip parts from the hub, extract, check, split.

Layout of the dataset repo `nkp37/OpenVid-1M` (its README): `OpenVid_part{N}.zip` at the
root; parts over 50 GB are split into `OpenVid_part{N}_part{aa,ab,...}` pieces to be
concatenated; the captions are `data/train/OpenVid-1M.csv` (columns video, caption,
aesthetic score, motion score, temporal consistency score, camera motion, frame, fps,
seconds). Zip members sit in sub-folders; like the README's `unzip -j` we keep base names.

Called by `osv data` (osv/data/prepare.py) when data.source == "openvid". Output, as for
the embedded data set: data/clips/{train,test}/*.mp4 (hard links to the extracted files,
not re-encoded), data/clips/manifest.csv and data/clips/report.json. As in the embedded
manifest, a row describes the clip to cut, which `osv.video.load_clip` does: data.frames
frames at data.fps from start_sec 0 (resampled by time), resized/cropped to data.resolution;
each file's own frame count, rate and size are in report.json ("native").
"""

from __future__ import annotations

import csv
import itertools
import os
import random
import shutil
import sys
import zipfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from tqdm import tqdm

from osv.atomic import atomic_path, write_json
from osv.data import MANIFEST_COLUMNS, write_manifest
from osv.hub import fetch_file as hub_fetch
from osv.hub import link_or_copy, list_files, paths_info, repo_cache, resolve_commit

PART_ZIP = "OpenVid_part{n}.zip"
PART_PIECES = "OpenVid_part{n}_part*"
REPO_TYPE = "dataset"


def prepare(params: dict, out: Path) -> None:
    """Build data/clips from the configured OpenVid-1M parts (see module docstring)."""
    cfg = params["data"]["openvid"]
    repo, endpoint = cfg["repo_id"], cfg["endpoint"]
    commit = resolve_commit(repo, REPO_TYPE, cfg["revision"], endpoint, cfg["csv"])
    csv_path, csv_sha = fetch(repo, commit, endpoint, cfg["csv"])
    captions = read_captions(csv_path)
    videos, hashes = {}, {cfg["csv"]: csv_sha}
    for n in cfg["parts"]:
        folder, part_hashes = extract_part(repo, commit, endpoint, n)
        hashes.update(part_hashes)
        for mp4 in sorted(folder.iterdir()):
            videos.setdefault(mp4.name, (mp4, PART_ZIP.format(n=n)))
    min_seconds = params["data"]["frames"] / params["data"]["fps"]
    chosen, rejected, checked = select_clips(videos, captions, cfg, params["seed"], min_seconds)
    native = {r["video"]: {k: r.pop(k) for k in ("frames", "fps", "width", "height", "end_sec")} for r in chosen}
    d = params["data"]
    for r in chosen:
        r.update(end_sec=min_seconds, frames=d["frames"], fps=d["fps"], width=d["resolution"]["width"],
                 height=d["resolution"]["height"])
    report = {
        "source": "openvid", "repo_id": repo, "revision": cfg["revision"], "commit": commit,
        "csv": cfg["csv"], "parts": list(cfg["parts"]), "sha256": hashes, "seed": params["seed"],
        "clip_rule": f"whole file is the clip (start_sec 0); needs >= {min_seconds:.3f} s "
                     f"(data.frames {params['data']['frames']} at data.fps {params['data']['fps']})",
        "counts": {"videos_in_parts": len(videos), "not_in_csv": sum(v not in captions for v in videos),
                   "checked": checked, "rejected": len(rejected),
                   **{split: sum(r["split"] == split for r in chosen) for split in ("train", "test")}},
        "rejected": rejected,
        "native": native,
    }
    write_clips(out, chosen, videos, report)


def fetch(repo: str, commit: str, endpoint: str | None, path: str) -> tuple[Path, str]:
    remote = paths_info(repo, REPO_TYPE, commit, endpoint, [path])[path]
    return hub_fetch(repo, REPO_TYPE, commit, endpoint, remote)


def read_captions(path: Path) -> dict[str, str]:
    csv.field_size_limit(sys.maxsize)  # some captions are long
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "video" not in reader.fieldnames or "caption" not in reader.fieldnames:
            raise ValueError(f"{path}: expected columns 'video' and 'caption', got {reader.fieldnames}")
        return {row["video"]: row["caption"] for row in reader}


def part_remotes(repo: str, commit: str, endpoint: str | None, n: int):
    """The hub files of part n: one zip, or its split pieces in order."""
    files = list_files(repo, REPO_TYPE, commit, endpoint, [PART_ZIP.format(n=n), PART_PIECES.format(n=n)],
                       recursive=False)
    whole = [f for f in files if f.path == PART_ZIP.format(n=n)]
    if whole:
        return whole
    if not files:
        raise FileNotFoundError(f"dataset {repo}@{commit}: no {PART_ZIP.format(n=n)} (nor split pieces "
                                f"{PART_PIECES.format(n=n)}); check data.openvid.parts")
    return sorted(files, key=lambda f: f.path)


def extract_part(repo: str, commit: str, endpoint: str | None, n: int) -> tuple[Path, dict[str, str]]:
    """Download (resumably) and extract part n once into the download cache; return its folder of mp4s."""
    cache = repo_cache(REPO_TYPE, repo, commit)
    target = cache / "extracted" / f"OpenVid_part{n}"
    remotes = part_remotes(repo, commit, endpoint, n)
    hashes = {}
    local = []
    for remote in remotes:
        path, hashes[remote.path] = hub_fetch(repo, REPO_TYPE, commit, endpoint, remote)
        local.append(path)
    if target.is_dir():
        return target, hashes
    zip_path = local[0]
    if len(local) > 1:  # `cat OpenVid_partN_part* > OpenVid_partN.zip`, as the README says
        zip_path = cache / "joined" / PART_ZIP.format(n=n)
        with atomic_path(zip_path) as tmp, open(tmp, "wb") as out:
            for piece in local:
                with open(piece, "rb") as src:
                    shutil.copyfileobj(src, out, 16 * 1024 * 1024)
    with atomic_path(target) as tmp:
        unzip_flat(zip_path, tmp)
    if len(local) > 1:
        zip_path.unlink()  # the pieces stay cached; the joined copy would double the disk use
    return target, hashes


def unzip_flat(zip_path: Path, folder: Path) -> None:
    """Extract the .mp4 members by base name (also keeps members from escaping `folder`)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        archive = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile as exc:
        raise ValueError(f"{zip_path}: not a zip file ({exc})") from exc
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir() and m.filename.lower().endswith(".mp4")]
        for m in tqdm(members, desc=f"extract {zip_path.name}", unit="video"):
            with archive.open(m) as src, open(folder / Path(m.filename).name, "wb") as dst:
                shutil.copyfileobj(src, dst, 16 * 1024 * 1024)


def probe_video(path: str, min_seconds: float) -> dict:
    """Decode the frames a clip uses and demux the rest; raise ValueError with the reason if unusable."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            if fps <= 0:
                raise ValueError("unknown frame rate")
            decoded, packets, size = 0, 0, None
            for packet in container.demux(stream):
                if packet.size == 0:
                    packets_left = packet.decode()  # flush packet: drain the decoder
                else:
                    packets += 1
                    packets_left = packet.decode() if decoded < fps * min_seconds + 1 else []
                for frame in packets_left:
                    decoded += 1
                    size = (frame.width, frame.height)
            declared = stream.frames
    except av.FFmpegError as exc:
        raise ValueError(f"undecodable: {exc}") from exc
    if decoded == 0 or size is None:
        raise ValueError("no decodable frames")
    if declared and packets < declared:
        raise ValueError(f"truncated: {packets} of {declared} frames present")
    duration = packets / fps
    if duration + 1e-6 < min_seconds:
        raise ValueError(f"too short: {duration:.3f} s < {min_seconds:.3f} s")
    if decoded < min(packets, int(fps * min_seconds)):
        raise ValueError(f"decoded only {decoded} of the first {int(fps * min_seconds)} frames")
    return {"frames": packets, "fps": round(fps, 4), "width": size[0], "height": size[1],
            "end_sec": round(duration, 4)}


def _probe(args: tuple[str, float]) -> tuple[dict | None, str | None]:
    try:
        return probe_video(*args), None
    except ValueError as exc:
        return None, str(exc)


def select_clips(videos: dict, captions: dict, cfg: dict, seed: int, min_seconds: float):
    """Seeded split: shuffle the captioned videos, check them in that order, fill test then train.

    Returns (rows, rejected, number checked). Only as many videos are decoded as the split needs.
    """
    names = sorted(v for v in videos if v in captions)
    random.Random(seed).shuffle(names)
    want = {"test": cfg["test_clips"], "train": cfg["train_subset"] or len(names)}
    rows, rejected, checked = [], [], 0
    workers = max(1, min(8, os.cpu_count() or 1))
    bar = tqdm(total=min(len(names), want["test"] + want["train"]), desc="check videos", unit="video")
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        it = iter(names)
        while len(rows) < want["test"] + want["train"] and (batch := list(itertools.islice(it, workers * 8))):
            for name, (info, reason) in zip(batch, pool.map(_probe, [(str(videos[n][0]), min_seconds) for n in batch])):
                checked += 1
                if info is None:
                    rejected.append({"video": name, "source": videos[name][1], "reason": reason})
                    continue
                n_test = sum(r["split"] == "test" for r in rows)
                split = "test" if n_test < want["test"] else "train"
                if split == "train" and len(rows) - n_test >= want["train"]:
                    break
                rows.append({"video": f"{split}/{name}", "caption": captions[name], "split": split,
                             "source": f"openvid:{videos[name][1]}", "start_sec": 0.0, **info})
                bar.update(1)
    bar.close()
    n_test = sum(r["split"] == "test" for r in rows)
    if n_test < want["test"] or n_test == len(rows):
        raise ValueError(f"data.openvid: {len(rows)} usable videos in parts {cfg['parts']} "
                         f"({len(rejected)} rejected), but data.openvid.test_clips={cfg['test_clips']} "
                         "needs that many plus at least one training clip: add parts")
    return sorted(rows, key=lambda r: (r["split"], r["video"])), rejected, checked


def write_clips(out: Path, rows: list[dict], videos: dict, report: dict) -> None:
    """data/clips/{train,test}/, manifest.csv, report.json, all renamed into place at once."""
    with atomic_path(out) as tmp:
        for split in ("train", "test"):
            (tmp / split).mkdir(parents=True)
        for row in tqdm(rows, desc="link clips", unit="clip"):
            link_or_copy(videos[Path(row["video"]).name][0], tmp / row["video"])
        write_manifest(tmp / "manifest.csv", [{k: row[k] for k in MANIFEST_COLUMNS} for row in rows])
        write_json(tmp / "report.json", report)
