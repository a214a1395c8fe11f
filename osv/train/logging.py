"""Training curves (per-step CSV for `dvc plots`) and the tqdm progress bar."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from osv.atomic import write_text

TRAIN_COLUMNS = ["step", "loss_d_real", "loss_d_fake", "loss_g_adv", "loss_distance", "logits_real_mean",
                 "logits_fake_mean", "grad_norm_g", "grad_norm_d", "lr", "overflow_count"]


class Curve:
    """Rows of per-step numbers; serialised as CSV (into checkpoints and the plots file)."""

    def __init__(self, columns: list[str]):
        self.columns = list(columns)
        self.rows: list[dict] = []

    def append(self, row: dict) -> None:
        unknown = set(row) - set(self.columns)
        if unknown:
            raise KeyError(f"curve row has unknown columns {sorted(unknown)} (known: {self.columns})")
        self.rows.append({c: row.get(c, "") for c in self.columns})

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: _fmt(v) for k, v in row.items()})
        return buf.getvalue()

    @classmethod
    def from_csv(cls, text: str, columns: list[str], max_step: int | None = None) -> Curve:
        """Rows of an earlier run (a resumed run's history), up to and including max_step."""
        curve = cls(columns)
        for row in csv.DictReader(io.StringIO(text)):
            if max_step is None or int(row["step"]) <= max_step:
                curve.rows.append({c: row.get(c, "") for c in columns})
        return curve

    def write(self, path: str | Path) -> None:
        write_text(path, self.to_csv())

    def last(self, key: str, window: int = 1) -> float:
        """Mean of the last `window` numeric values of a column (NaN if none)."""
        vals = [float(r[key]) for r in self.rows[-window:] if r.get(key, "") != ""]
        return sum(vals) / len(vals) if vals else math.nan


def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) else v


def progress(total: int, initial: int = 0, desc: str = "", enabled: bool = True):
    """A tqdm bar (it/s and ETA in its default format); silent on non-main ranks."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True,
                smoothing=0.1)
