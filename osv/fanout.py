"""The fan-out's shared pieces (docs/design.md "Fan-out"): which units a job takes, and the jobs'
receipts that a gather reads."""

from __future__ import annotations

import json
from pathlib import Path


def part_range(count: int, part: int, jobs: int) -> range:
    """Job `part` of `jobs` takes a contiguous range of the `count` units (sizes differ by <= 1)."""
    return range(part * count // jobs, (part + 1) * count // jobs)


def read_receipts(paths: list[Path], what: str, command: str) -> list[dict]:
    """Every job's receipt in part order; a missing one names its part and the command that makes it."""
    receipts = []
    for part, path in enumerate(paths):
        if not path.exists():
            raise FileNotFoundError(f"{path}: {what} part {part} of {len(paths)} has not finished "
                                    f"(run `{command} --part {part}`)")
        receipts.append(json.loads(path.read_text()))
    return receipts
