"""Log lines a person can read after the fact: a timestamp on every line, and progress bars as
periodic lines when the output is a file or a pipe (a SLURM job log, Snakemake's `| tee`), not a
terminal. On a terminal nothing changes. Plumbing: no stage's results depend on it.
"""

from __future__ import annotations

import os
import sys
import time

# Off a terminal a progress bar prints one line per this many seconds (tqdm's mininterval, read from
# TQDM_MININTERVAL when tqdm is first imported; a SLURM job inherits it from the submitting shell).
PROGRESS_EVERY_S = 30


def stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


class TimestampedLines:
    """A text stream whose every line becomes `YYYY-mm-dd HH:MM:SS text`. A progress bar redraws
    itself with `\r<state>` (tqdm, also on every set_postfix): its latest state is written as a line
    at most once per PROGRESS_EVERY_S, and its last state when the bar ends with a newline.
    `unstamped` is the stream underneath (for lines relayed from a job's log, already stamped)."""

    def __init__(self, stream, every_s: float = PROGRESS_EVERY_S):
        self.unstamped, self.partial, self.every_s, self.shown = stream, "", every_s, float("-inf")

    def write(self, text: str) -> int:
        *lines, partial = (self.partial + text).split("\n")
        for line in lines:
            self._emit(line.rsplit("\r", 1)[-1])
        self.partial = partial.rsplit("\r", 1)[-1] if "\r" in partial else partial
        if "\r" in partial and self.partial.strip() and time.monotonic() - self.shown >= self.every_s:
            self._emit(self.partial)
            self.shown = time.monotonic()
        self.unstamped.flush()
        return len(text)

    def _emit(self, line: str) -> None:
        if line.strip():
            self.unstamped.write(f"{stamp()} {line.rstrip()}\n")

    def flush(self) -> None:
        self.unstamped.flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name):
        return getattr(self.unstamped, name)


def setup(stdout: bool = True) -> None:
    """Stamp stderr (and stdout, unless it carries data such as `--json` output) where they are not
    terminals; make progress bars periodic there. Call before tqdm is imported (osv.cli does, first
    thing; osv.launch in a job)."""
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_MININTERVAL", str(PROGRESS_EVERY_S))
    for name in ("stdout", "stderr") if stdout else ("stderr",):
        stream = getattr(sys, name)
        if not stream.isatty() and not isinstance(stream, TimestampedLines):
            setattr(sys, name, TimestampedLines(stream))


def unstamped(line: str) -> str:
    """The line without the timestamp TimestampedLines put in front of it (for tools that parse logs)."""
    head = line[:20]
    return line[20:] if len(head) == 20 and time_format_ok(head[:19]) and head[19] == " " else line


def time_format_ok(text: str) -> bool:
    try:
        time.strptime(text, "%Y-%m-%d %H:%M:%S")
    except ValueError:
        return False
    return True
