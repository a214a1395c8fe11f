"""Atomic outputs: write to a temporary name beside the target, then rename.

An interrupted stage therefore never leaves a file (or folder) that looks complete, and a
failed write says which output it was writing and why (a full disk, a quota, permissions).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

# Below this much free space a writer's own error is taken for a full disk: torch.save does
# not raise OSError there ("unexpected pos 576 vs 534").
LOW_SPACE = 16 * 2**20
RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors reports an I/O error


def _named(exc: Exception, path: Path, tmp_dir: Path) -> Exception:
    """`exc` re-made so its message names the output `path` and the cause; `exc` itself if
    that is not a write error (it then gets a note naming `path`)."""
    if getattr(exc, "write_target", None):  # a nested atomic_path already named its output
        return exc
    if isinstance(exc, OSError) and exc.errno:
        reason = exc.strerror or os.strerror(exc.errno)
        if exc.filename and not str(exc.filename).startswith(str(tmp_dir)):
            reason += f" ({exc.filename})"  # an input, not the output being written
        try:
            err = type(exc)(exc.errno, f"writing {path}: {reason}")  # keeps PermissionError etc.
        except TypeError:
            err = OSError(exc.errno, f"writing {path}: {reason}")
    else:
        if found := RUST_OS_ERROR.search(str(exc)):
            code = int(found.group(1))
        else:
            try:
                free = shutil.disk_usage(path.parent).free
            except OSError:
                free = LOW_SPACE
            if free >= LOW_SPACE:
                exc.add_note(f"while writing {path}")
                return exc
            code = errno.ENOSPC
        err = OSError(code, f"writing {path}: {os.strerror(code)} ({type(exc).__name__}: {exc})")
    err.write_target = path
    return err


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ""):
    """Yield a temporary path in the target's folder; rename it onto `path` on success.

    Works for files and folders. `suffix` keeps an extension that writers (PyAV,
    safetensors) look at. An OSError (or a writer's error on a full disk) is re-raised as an
    OSError whose message starts "writing <path>: <cause>".
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)) / f"out{suffix}"
    except OSError as exc:
        raise _named(exc, path, path.parent) from exc
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except Exception as exc:
        err = _named(exc, path, tmp.parent)  # before the cleanup: the partial output still holds the space
        if err is exc:
            raise
        raise err from exc
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
