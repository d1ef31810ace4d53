"""pipeline/atomic.py, the one write-then-rename: a reader sees the old file or the new one,
never half of one, and nothing is left behind under the real name."""

from __future__ import annotations

import os
import stat

import pytest

from pipeline.atomic import OutOfSpace, out_of_space, replacing, temporary_path, write_atomic
from tests.helpers import small_disk


def test_the_new_content_appears_in_one_rename(tmp_path):
    path = tmp_path / "sub" / "f.json"
    with replacing(path) as tmp:
        tmp.write_text("new")
        assert not path.exists() and tmp.name.startswith(".f.json.") and tmp.parent == path.parent
    assert path.read_text() == "new" and os.listdir(path.parent) == ["f.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "f.json"
    path.write_text("old")
    with pytest.raises(OSError):
        with replacing(path) as tmp:
            tmp.write_text("half")
            raise OSError(5, "Input/output error")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f.json"]


def test_a_full_disk_is_one_clear_error_and_leaves_the_old_file(tmp_path):
    """On a real 64 KB filesystem: the write that does not fit raises OutOfSpace, which names
    the file and the room left, and removes its temporary; the old file is untouched."""
    with small_disk(tmp_path / "disk", "64k") as disk:
        path = disk / "f.json"
        write_atomic(path, "old")
        with pytest.raises(OutOfSpace) as full:
            write_atomic(path, b"x" * 200_000)
        assert isinstance(full.value, OSError) and full.value.errno == 28
        assert str(full.value).startswith(f"out of space writing {path}: ") and " free there" in str(full.value)
        assert path.read_text() == "old" and os.listdir(disk) == ["f.json"]
        # found again inside what wraps it (a worker pool, Ray), and from a bare ENOSPC
        try:
            raise RuntimeError("a task failed") from full.value
        except RuntimeError as wrapped:
            assert out_of_space(wrapped) is full.value
        assert str(out_of_space(OSError(28, "No space left on device", str(path)))).startswith(
            f"out of space writing {path}"
        )


def test_a_block_that_removes_its_file_renames_nothing(tmp_path):
    path = tmp_path / "shard.tar"
    with replacing(path) as tmp:
        tmp.write_bytes(b"nothing worth keeping")
        tmp.unlink()
    assert not path.exists()


def test_write_atomic_sets_permissions_from_the_first_byte(tmp_path):
    path = write_atomic(tmp_path / "token", "secret\n", mode=0o600)
    assert path.read_text() == "secret\n" and stat.S_IMODE(path.stat().st_mode) == 0o600
    write_atomic(path, b"bytes too")
    assert path.read_bytes() == b"bytes too"
    assert temporary_path(path).name == f".token.{os.getpid()}.tmp"  # what pipeline.outdir clears up
    assert temporary_path(path, ".png").name == f".token.{os.getpid()}.tmp.png"  # for writers that go by suffix
