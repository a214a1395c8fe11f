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

Test split, by source video and stable when `parts` grows (see `select_clips`): the test clips
all come from one zip part, data.openvid.test_part (which must be listed in parts). A clip's
source video is its name without the clip-range suffix (`source_of`); the sources of the test
part are ranked by sha256(f"{seed}:{source}") and their clips taken, source by source, until
test_clips usable ones are in. Every other clip of those test sources, in any part, is held
back (in neither split), so no source has clips on both sides; all other clips are training
clips. The test set is thus a function of the seed, the test part's files, test_clips and the
decode check (data.frames/data.fps) only: adding parts adds training clips (all of them with
train_subset 0) and held-back siblings, and never moves a clip across the split.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import os
import re
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
    cfg = params["data"]["openvid"]  # test_part in parts: osv.params checked it before any download
    repo, endpoint = cfg["repo_id"], cfg["endpoint"]
    commit = resolve_commit(repo, REPO_TYPE, cfg["revision"], endpoint, cfg["csv"])
    csv_path, csv_sha = fetch(repo, commit, endpoint, cfg["csv"])
    captions = read_captions(csv_path)
    videos, hashes = {}, {cfg["csv"]: csv_sha}
    # The test part first: a file name found in several parts then counts as the test part's.
    for n in dict.fromkeys([cfg["test_part"], *cfg["parts"]]):
        folder, part_hashes = extract_part(repo, commit, endpoint, n)
        hashes.update(part_hashes)
        for mp4 in sorted(folder.iterdir()):
            videos.setdefault(mp4.name, (mp4, PART_ZIP.format(n=n)))
    min_seconds = params["data"]["frames"] / params["data"]["fps"]
    chosen, rejected, checked, split = select_clips(videos, captions, cfg, params["seed"], min_seconds)
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
                   **{s: sum(r["split"] == s for r in chosen) for s in ("train", "test")},
                   "test_sources": len(split["test_sources"]), "held_back": len(split["held_back"])},
        "split": split,
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
    """Download (resumably) and extract part n once into the download cache; return its folder of
    mp4s and the SHA-256 of its hub files. Once extracted, the part's record (beside the folder)
    keeps those hashes and its zip (or pieces) is deleted: ~50 GB per part not kept twice."""
    cache = repo_cache(REPO_TYPE, repo, commit)
    target = cache / "extracted" / f"OpenVid_part{n}"
    record = target.with_name(f"{target.name}.json")
    if target.is_dir() and record.exists():
        return target, json.loads(record.read_text())["sha256"]
    remotes = part_remotes(repo, commit, endpoint, n)
    hashes, local = {}, []
    for remote in remotes:
        path, hashes[remote.path] = hub_fetch(repo, REPO_TYPE, commit, endpoint, remote)
        local.append(path)
    if not target.is_dir():
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
            zip_path.unlink()
    write_json(record, {"part": n, "sha256": hashes, "videos": sum(1 for _ in target.iterdir())})
    for path in local:  # the record vouches for them now
        path.unlink(missing_ok=True)
        Path(f"{path}.sha256").unlink(missing_ok=True)
    return target, hashes


def fetch_part(params: dict, n: int, receipt: str) -> dict:
    """One job of the data fan-out: OpenVid part n downloaded, checked and extracted (extract_part),
    and its receipt written (what the data rule's gather waits for)."""
    cfg = params["data"]["openvid"]
    commit = resolve_commit(cfg["repo_id"], REPO_TYPE, cfg["revision"], cfg["endpoint"], cfg["csv"])
    folder, hashes = extract_part(cfg["repo_id"], commit, cfg["endpoint"], n)
    out = {"part": n, "commit": commit, "folder": str(folder), "sha256": hashes,
           "videos": sum(1 for _ in folder.iterdir())}
    write_json(receipt, out)
    return out


# what a finished job leaves (osv.launch reuses a completed job only while it exists)
fetch_part.outputs = lambda receipt, **_: [receipt]


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


# A clip-range suffix: one or more trailing `_<n>` / `_<a>to<b>` / `_<a>-<b>` groups (n, a, b numbers).
_CLIP_SUFFIX = re.compile(r"(?:_\d+(?:\.\d+)?(?:(?:to|-)\d+(?:\.\d+)?)?)+$")
SPLIT_RULE = ("test: the clips of data.openvid.test_part, source by source in order of "
              "sha256('{seed}:{source}'), until test_clips usable ones; held back: the other clips of "
              "those sources, in any part; train: the rest (the lowest sha256('{seed}:{video}') first "
              "when train_subset > 0); source: the file name less '.mp4' and its trailing clip-range "
              "suffix (osv.data.openvid.source_of)")


def source_of(name: str) -> str:
    """The source video of a clip: its file name less `.mp4` and less a trailing clip-range suffix.

    OpenVid-1M names its clips after the video they were cut from plus the clip's place in it:
    Panda-70M clips `<youtube id>_<clip index>_<first>to<last frame>` (`---_iRTHryQ_13_0to241.mp4`),
    CelebV-HQ clips `celebv_<youtube id>_<index>`. The suffix stripped is the longest run of trailing
    `_<n>`, `_<a>to<b>` or `_<a>-<b>` groups (numbers, decimals allowed), so
    `---_iRTHryQ_13_0to241` -> `---_iRTHryQ`, `celebv___f2KtcXAxI_0` -> `celebv___f2KtcXAxI`,
    `abc_10_20` -> `abc`. A name with no such suffix (or nothing before it) is its own source.
    Stripping too much can only merge two sources (a coarser split, never a leak); YouTube ids
    end in a number group only by chance, and then merge only with ids sharing the rest.
    """
    stem = name[:-4] if name.lower().endswith(".mp4") else name
    m = _CLIP_SUFFIX.search(stem)
    return stem[:m.start()] if m and m.start() > 0 else stem


def rank_key(seed: int, key: str) -> tuple[str, str]:
    """The seeded sort key of a source (test order) or clip name (train order)."""
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest(), key


def _probed(pool, names, videos: dict, min_seconds: float, cache: dict, batch: int):
    """Yield (name, info, reason) for `names` in order, probing ahead in parallel batches (cached)."""
    it = iter(names)
    while chunk := list(itertools.islice(it, batch)):
        todo = [n for n in chunk if n not in cache]
        cache.update(zip(todo, pool.map(_probe, [(str(videos[n][0]), min_seconds) for n in todo])))
        for n in chunk:
            yield n, *cache[n]


def select_clips(videos: dict, captions: dict, cfg: dict, seed: int, min_seconds: float):
    """Split the captioned videos by source video; returns (rows, rejected, number checked, split).

    Test: the captioned clips of part cfg["test_part"], grouped by `source_of`, sources in order of
    sha256(f"{seed}:{source}"), each source's clips by name; they are checked (`probe_video`) in that
    order and taken until cfg["test_clips"] usable ones are in. A rejected clip is dropped (listed
    in `rejected`, never moved to train) and the fill goes on with the next clip, so a corrupt file
    adds the next clip in the order instead; whether a file decodes is fixed by its bytes, so the
    test set still depends only on (seed, test part, test_clips, data.frames/data.fps), never on the
    other parts. The test sources are those with a test clip; their remaining clips, in every part
    (the last source may be cut short to hit test_clips exactly), are held back: in no split.
    Train: every other captioned clip (the test part's later sources included), checked in order of
    sha256(f"{seed}:{name}"); cfg["train_subset"] > 0 keeps the first that many usable ones.
    Growing `parts` therefore keeps the test set and every training clip (with train_subset 0) and
    only adds training clips and held-back siblings. Only the clips the split needs are decoded.
    Raises ValueError when the test part cannot fill test_clips or no training clip is left.
    """
    test_zip = PART_ZIP.format(n=cfg["test_part"])
    captioned = [v for v in videos if v in captions]
    by_source: dict[str, list[str]] = {}
    for name in sorted(v for v in captioned if videos[v][1] == test_zip):
        by_source.setdefault(source_of(name), []).append(name)
    test_order = [n for src in sorted(by_source, key=lambda s: rank_key(seed, s)) for n in by_source[src]]
    rows, rejected, consumed, cache = [], [], set(), {}
    workers = max(1, min(8, os.cpu_count() or 1))

    def take(name, info, reason, split):
        consumed.add(name)
        if info is None:
            rejected.append({"video": name, "source": videos[name][1], "reason": reason, "checked_for": split})
            return False
        rows.append({"video": f"{split}/{name}", "caption": captions[name], "split": split,
                     "source": f"openvid:{videos[name][1]}", "start_sec": 0.0, **info})
        return True

    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        n_test = 0
        with tqdm(total=cfg["test_clips"], desc="check test videos", unit="video") as bar:
            for name, info, reason in _probed(pool, test_order, videos, min_seconds, cache, workers * 2):
                if take(name, info, reason, "test"):
                    n_test += 1
                    bar.update(1)
                if n_test == cfg["test_clips"]:
                    break
        if n_test < cfg["test_clips"]:
            raise ValueError(f"data.openvid: test part {cfg['test_part']} ({test_zip}) has {n_test} usable "
                             f"captioned clips ({len(rejected)} rejected), fewer than data.openvid.test_clips="
                             f"{cfg['test_clips']}: lower test_clips or choose another test_part")
        test_sources = {source_of(Path(r["video"]).name) for r in rows}
        held_back = sorted(v for v in captioned if v not in consumed and source_of(v) in test_sources)
        train_order = sorted((v for v in captioned if v not in consumed and source_of(v) not in test_sources),
                             key=lambda v: rank_key(seed, v))
        want = cfg["train_subset"] or len(train_order)
        n_train = 0
        with tqdm(total=min(want, len(train_order)), desc="check train videos", unit="video") as bar:
            for name, info, reason in _probed(pool, train_order, videos, min_seconds, cache, workers * 8):
                if take(name, info, reason, "train"):
                    n_train += 1
                    bar.update(1)
                if n_train == want:
                    break
    if n_train == 0:
        raise ValueError(f"data.openvid: no usable training clip in parts {list(cfg['parts'])} besides the "
                         f"{cfg['test_clips']} test clips and the {len(held_back)} clips held back with their "
                         f"sources ({len(rejected)} rejected): add parts")
    split = {"rule": SPLIT_RULE, "test_part": cfg["test_part"], "test_sources": sorted(test_sources),
             "held_back": held_back}
    return sorted(rows, key=lambda r: (r["split"], r["video"])), rejected, len(consumed), split


def write_clips(out: Path, rows: list[dict], videos: dict, report: dict) -> None:
    """data/clips/{train,test}/, manifest.csv, report.json, all renamed into place at once."""
    with atomic_path(out) as tmp:
        for split in ("train", "test"):
            (tmp / split).mkdir(parents=True)
        for row in tqdm(rows, desc="link clips", unit="clip"):
            link_or_copy(videos[Path(row["video"]).name][0], tmp / row["video"])
        write_manifest(tmp / "manifest.csv", [{k: row[k] for k in MANIFEST_COLUMNS} for row in rows])
        write_json(tmp / "report.json", report)
