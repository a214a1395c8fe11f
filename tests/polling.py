"""Waiting for state that lags (SLURM accounting, a job's progress file)."""

from __future__ import annotations

import time


def poll(read, done, timeout_s: float, interval_s: float = 0.5):
    """Call read() until done(value) or timeout_s passes; return the last value."""
    end = time.monotonic() + timeout_s
    value = read()
    while not done(value) and time.monotonic() < end:
        time.sleep(interval_s)
        value = read()
    return value
