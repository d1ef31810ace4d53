"""What several test modules share (fixtures live in the conftest files)."""

from __future__ import annotations

import tarfile
from pathlib import Path

from pipeline.shard import ShardConfig

REPO = Path(__file__).resolve().parents[1]
SHARD_SIZE = 64  # small shards so the 300-image sample set spans several of them


def shard_config(src: Path, out: Path, **kw) -> ShardConfig:
    kw.setdefault("workers", 2)
    kw.setdefault("samples_per_shard", SHARD_SIZE)
    return ShardConfig(src=src, out=out, progress=False, **kw)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def read_tar(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
