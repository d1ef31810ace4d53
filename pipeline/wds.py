"""WebDataset tar shards, written reproducibly, and their DALI index files.

A shard is a plain POSIX (ustar) tar whose members are `<key>.<ext>`, a sample's members
consecutive. Every header field that could vary between runs (mtime, owner, mode) is fixed,
so the same samples always give the same bytes: that is what makes an interrupted and
resumed run byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import io
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


class _HashingFile(io.RawIOBase):
    """File wrapper that hashes what passes through and knows its offset."""

    def __init__(self, f):
        self._f = f
        self.sha256 = hashlib.sha256()
        self.offset = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.offset

    def write(self, b) -> int:
        n = self._f.write(b)
        self.sha256.update(b)
        self.offset += len(b)
        return n


class ShardTarWriter:
    """Write samples into a tar at `path`; records offsets for the index as it goes."""

    def __init__(self, path: Path):
        self._file = open(path, "wb")
        self._hashing = _HashingFile(self._file)
        self._tar = tarfile.open(fileobj=self._hashing, mode="w", format=tarfile.USTAR_FORMAT)
        self.index_lines: list[str] = []
        self.num_samples = 0

    def add(self, key: str, members: dict[str, bytes]) -> None:
        components = []
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            header_at = self._hashing.offset
            self._tar.addfile(info, io.BytesIO(data))
            components.append(f"{ext} {header_at + tarfile.BLOCKSIZE} {len(data)} {info.name}")
        self.index_lines.append(" ".join(components))
        self.num_samples += 1

    def close(self) -> tuple[int, str]:
        """Finish the archive; returns (bytes, sha256 hex)."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return self._hashing.offset, self._hashing.sha256.hexdigest()

    def index_text(self) -> str:
        """The same text DALI's wds2idx writes for this tar (tests hold them equal)."""
        return f"{IDX_VERSION} {len(self.index_lines)}\n" + "".join(line + "\n" for line in self.index_lines)


def write_index_with_dali(tar_path: Path, idx_path: Path) -> bool:
    """Index `tar_path` with DALI's own wds2idx. False where DALI is not installed."""
    try:
        from wds2idx import IndexCreator  # installed by nvidia-dali-cuda1xx
    except ImportError:
        return False
    with IndexCreator(str(tar_path), str(idx_path), verbose=False) as creator:
        creator.create_index()
    return True

