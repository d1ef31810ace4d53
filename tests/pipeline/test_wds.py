"""The tar writer: byte-for-byte what Python's tarfile writes, and its index what DALI reads."""

from __future__ import annotations

import io
import tarfile

import pytest

from pipeline.wds import ShardTarWriter, sanitise_key, unique_keys


def tarfile_bytes(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
                    len(data),
                    0,
                    0o644,
                    0,
                    0,
                    "",
                    "",
                )
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("count", [0, 1, 7, 40])
def test_same_bytes_as_tarfile(tmp_path, count):
    samples = [
        (
            f"k{i:04d}_{'x' * (i % 70)}",
            {"jpg": bytes(range(256)) * (i * 13 % 50 + 1) + b"z" * i, "cls": str(i).encode(), "json": b"{}" * (i % 3)},
        )
        for i in range(count)
    ]
    w = ShardTarWriter(tmp_path / "a.tar")
    for key, members in samples:
        w.add(key, members)
    nbytes, _ = w.close()
    data = (tmp_path / "a.tar").read_bytes()
    assert data == tarfile_bytes(samples) and nbytes == len(data)
    with tarfile.open(tmp_path / "a.tar") as tar:  # and every offset in the index points at its member
        members = {m.name: m for m in tar.getmembers()}
    for line in w.index_text().splitlines()[1:]:
        parts = line.split()
        for ext, offset, size, name in zip(parts[0::4], parts[1::4], parts[2::4], parts[3::4]):
            assert members[name].offset_data == int(offset) and members[name].size == int(size)
            assert name.endswith("." + ext)


def test_keys_are_safe_and_unique():
    assert sanitise_key("train/n01/n01_1.JPEG") == "n01_1"
    assert sanitise_key("a/b c.d.e.png") == "b_c"
    assert unique_keys(["x/a.jpg", "y/a.png", "z/b.jpg"]) == ["a_0", "a_1", "b"]
