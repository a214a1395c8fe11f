"""osv.atomic: a failed write names the output and the cause, and leaves nothing behind."""

from __future__ import annotations

import errno

import pytest

from osv.atomic import atomic_path


def test_os_errors_name_the_output_and_keep_their_type(tmp_path):
    out = tmp_path / "x" / "out.bin"
    with pytest.raises(OSError, match=f"writing {out}: Disk quota exceeded") as info:
        with atomic_path(out) as tmp:
            tmp.write_bytes(b"partial")
            raise OSError(errno.EDQUOT, "Disk quota exceeded", str(tmp))
    assert info.value.errno == errno.EDQUOT
    with pytest.raises(PermissionError, match=f"writing {out}: Permission denied"):
        with atomic_path(out):
            raise PermissionError(errno.EACCES, "Permission denied")
    assert list(out.parent.iterdir()) == []  # no temp folder, no output


def test_other_errors_pass_through_with_a_note(tmp_path):
    out = tmp_path / "out.bin"
    with pytest.raises(ValueError, match="bad value") as info:
        with atomic_path(out):
            raise ValueError("bad value")
    assert info.value.__notes__ == [f"while writing {out}"]
    assert list(tmp_path.iterdir()) == []
