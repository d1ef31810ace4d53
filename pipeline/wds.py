"""WebDataset tar shards, written reproducibly, and their index files in DALI's wds2idx format
(written here from the offsets recorded while writing; DALI is not needed to write them).

A shard is a plain POSIX (ustar) tar whose members are `<key>.<ext>`, a sample's members
consecutive. Every header field that could vary between runs (mtime, owner, mode) is fixed,
so the same samples always give the same bytes: that is what makes an interrupted and
resumed run byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import tarfile
from pathlib import Path

KEY_MAX_CHARS = 90  # + ".json" stays within ustar's 100-character name field
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
IDX_VERSION = "v1.2"  # DALI's wds2idx format


def sanitise_key(relpath: str) -> str:
    """Source path -> sample key: the file stem, no dots (DALI and webdataset split the
    extension at the FIRST dot), only [A-Za-z0-9_-], at most KEY_MAX_CHARS."""
    stem = relpath.rsplit("/", 1)[-1].split(".", 1)[0]
    key = _UNSAFE.sub("_", stem).strip("_") or "sample"
    return key[:KEY_MAX_CHARS]


def unique_keys(relpaths: list[str]) -> list[str]:
    """Keys for a split, disambiguated deterministically where two stems collide
    (ImageNet's own stems are unique; arbitrary user folders may not be)."""
    keys = [sanitise_key(p) for p in relpaths]
    seen: dict[str, int] = {}
    counts: dict[str, int] = {}
    for k in keys:
        counts[k] = counts.get(k, 0) + 1
    out = []
    for k in keys:
        if counts[k] == 1:
            out.append(k)
            continue
        n = seen.get(k, 0)
        seen[k] = n + 1
        suffix = f"_{n}"
        out.append(k[: KEY_MAX_CHARS - len(suffix)] + suffix)
    return out


@functools.cache
def _header_template() -> bytes:
    """tarfile's own ustar header for a member with every varying field fixed (mtime 0,
    uid/gid 0, mode 0644, no owner names); `_header` patches in name, size and checksum."""
    info = tarfile.TarInfo("x")
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = 0, 0, 0o644, 0, 0, "", ""
    return info.tobuf(format=tarfile.USTAR_FORMAT, encoding=tarfile.ENCODING, errors="surrogateescape")


def _header(name: str, size: int) -> bytes:
    """The 512-byte ustar header tarfile would write (tests/pipeline/test_wds.py holds them
    byte-equal); building it here costs a tenth of tarfile.addfile per member."""
    raw = name.encode("ascii")  # keys are sanitised to [A-Za-z0-9_-] (+ ".ext")
    if len(raw) > 100:
        raise ValueError(f"tar member name over 100 bytes: {name!r}")
    h = bytearray(_header_template())
    h[0:100] = raw.ljust(100, b"\0")
    h[124:136] = b"%011o\0" % size
    h[148:156] = b" " * 8
    h[148:155] = b"%06o\0" % sum(h)
    return bytes(h)


class ShardTarWriter:
    """Write samples into a tar at `path`; records offsets for the index as it goes. The
    bytes are what Python's tarfile writes in ustar format (end blocks and record padding
    included), without its per-member overhead."""

    def __init__(self, path: Path):
        self._file = open(path, "wb")
        self._sha256 = hashlib.sha256()
        self.offset = 0
        self.index_lines: list[str] = []
        self.num_samples = 0

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self._sha256.update(data)
        self.offset += len(data)

    def add(self, key: str, members: dict[str, bytes]) -> None:
        components = []
        for ext, data in members.items():
            name = f"{key}.{ext}"
            components.append(f"{ext} {self.offset + tarfile.BLOCKSIZE} {len(data)} {name}")
            self._write(_header(name, len(data)))
            self._write(data)
            if len(data) % tarfile.BLOCKSIZE:
                self._write(bytes(tarfile.BLOCKSIZE - len(data) % tarfile.BLOCKSIZE))
        self.index_lines.append(" ".join(components))
        self.num_samples += 1

    def close(self) -> tuple[int, str]:
        """Finish the archive (two zero blocks, padded to tarfile's record size); returns
        (bytes, sha256 hex)."""
        self._write(bytes(2 * tarfile.BLOCKSIZE))
        if self.offset % tarfile.RECORDSIZE:
            self._write(bytes(tarfile.RECORDSIZE - self.offset % tarfile.RECORDSIZE))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return self.offset, self._sha256.hexdigest()

    def index_text(self) -> str:
        """The same text DALI's wds2idx writes for this tar (tests hold them equal)."""
        return f"{IDX_VERSION} {len(self.index_lines)}\n" + "".join(line + "\n" for line in self.index_lines)
