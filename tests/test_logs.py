"""Logs off a terminal: a timestamp on every line, progress bars as separate periodic lines."""

import io
import re
import subprocess
import sys
from pathlib import Path

from osv.logs import TimestampedLines

ROOT = Path(__file__).resolve().parent.parent
STAMPED = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \S")


def test_progress_bar_states_become_timestamped_lines():
    from tqdm import tqdm

    raw = io.StringIO()
    out = TimestampedLines(raw)
    for _ in tqdm(range(3), desc="encode", file=out, mininterval=0, miniters=1):
        print("a message", file=out)
    text = raw.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines and all(STAMPED.match(line) for line in lines), lines
    assert any("encode: 100%" in line and "3/3" in line for line in lines), lines
    assert sum("a message" in line for line in lines) == 3


def test_redraws_are_throttled_and_the_last_state_kept():
    """set_postfix redraws a bar on every step: off a terminal that is one line per period, plus the end."""
    raw = io.StringIO()
    out = TimestampedLines(raw, every_s=3600)
    for k in range(1, 101):
        out.write(f"\rtrain: {k}/100 loss={k}")
    out.write("\n")
    lines = raw.getvalue().splitlines()
    assert [ln.split(" ", 2)[2] for ln in lines] == ["train: 1/100 loss=1", "train: 100/100 loss=100"], lines


def test_a_command_piped_to_a_file_stamps_its_lines_and_makes_bars_periodic():
    code = ("import os, sys; from osv import logs; logs.setup(); print('hello'); "
            "print(os.environ['TQDM_MININTERVAL'], file=sys.stderr); "
            "print('job line', file=sys.stdout.unstamped)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                         env={"PATH": "/usr/bin:/bin"})
    assert STAMPED.match(out.stdout.splitlines()[0]) and out.stdout.splitlines()[0].endswith(" hello")
    assert out.stdout.splitlines()[1] == "job line"  # a job's relayed line keeps its own stamp only
    assert out.stderr.strip().endswith(" 30")
    cli = subprocess.run([Path(sys.executable).parent / "osv", "check", "--params", "params.yaml"], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    assert STAMPED.match(cli.stdout) and "params.yaml: valid" in cli.stdout
