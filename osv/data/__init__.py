"""Clip data sets: the manifest format shared by the embedded set and the OpenVid fetch.

`data/clips/manifest.csv` has one row per clip mp4 with MANIFEST_COLUMNS;
`video` is the path relative to the clips folder (e.g. `train/bikes-003.mp4`).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from osv.atomic import write_text

MANIFEST_COLUMNS = ("video", "caption", "split", "source", "start_sec", "end_sec", "frames", "fps",
                    "width", "height")
SPLITS = ("train", "test")
_INT_COLUMNS = ("frames", "width", "height")
_FLOAT_COLUMNS = ("start_sec", "end_sec", "fps")


def write_manifest(path: str | Path, rows: list[dict]) -> None:
    """Write manifest rows (dicts with MANIFEST_COLUMNS) atomically; floats rounded to 6 digits."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        missing = set(MANIFEST_COLUMNS) - set(row)
        if missing:
            raise ValueError(f"{path}: manifest row {row.get('video')} lacks {sorted(missing)}")
        writer.writerow({k: (f"{row[k]:.6f}" if k in _FLOAT_COLUMNS else row[k]) for k in MANIFEST_COLUMNS})
    write_text(path, buf.getvalue())


def read_manifest(path: str | Path, split: str | None = None) -> list[dict]:
    """Rows of a manifest (typed), optionally only one split, in file order."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: clip manifest not found (run `osv data` first)")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if tuple(reader.fieldnames or ()) != MANIFEST_COLUMNS:
            raise ValueError(f"{path}: manifest columns {reader.fieldnames}, expected {list(MANIFEST_COLUMNS)}")
        rows = []
        for row in reader:
            for k in _INT_COLUMNS:
                row[k] = int(row[k])
            for k in _FLOAT_COLUMNS:
                row[k] = float(row[k])
            if row["split"] not in SPLITS:
                raise ValueError(f"{path}: clip {row['video']} has split '{row['split']}', expected {SPLITS}")
            rows.append(row)
    return [r for r in rows if split is None or r["split"] == split]


def clip_id(row: dict) -> str:
    """A clip's id: its video path without the extension (unique within a manifest)."""
    return str(Path(row["video"]).with_suffix(""))
