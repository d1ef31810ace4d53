"""What several test modules share (fixtures live in the conftest files)."""

from __future__ import annotations

import os
import subprocess
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

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


def make_checkpoint(shard_set, folder: Path, seed: int = 0, epoch: int = 1, divide_by_std: bool = True) -> Path:
    """A checkpoint written by the trainer's own save function, with freshly initialised weights."""
    import torch

    from pipeline.shardset import open_shard_set
    from trainer.checkpoint import save
    from trainer.checkpoint_meta import ShardsMeta
    from trainer.model import AlexNet, AlexNetConfig

    out, manifest = shard_set
    shards = open_shard_set(out)
    torch.manual_seed(seed)
    model = AlexNet(AlexNetConfig(num_classes=shards.num_classes, init="kaiming")).eval()
    save(
        folder,
        model,
        classes=manifest["classes"],
        normalization=shards.normalization(divide_by_std=divide_by_std),
        epoch=epoch,
        metrics={"val_top1_error": 0.9},
        shards=ShardsMeta.of(out, manifest),
        run=folder.parent.name,
    )
    return folder


def register(run: Path, *names: str) -> None:
    """What the trainer does once every worker has persisted a checkpoint: point the run
    folder's latest_checkpoint.json at the newest (atomically)."""
    from trainer.checkpoint import POINTER, pointer_json

    tmp = run / f".{POINTER}.tmp"
    tmp.write_text(pointer_json(names[-1], int(names[-1].rsplit("_", 1)[-1])))
    os.replace(tmp, run / POINTER)


# Real photographs (../shared/photos beside the repository; SOURCES.md there says whence).
PHOTOS = REPO.parent / "shared" / "photos"


def photographs(count: int, max_bytes: int = 400_000) -> list[bytes]:
    """Up to `count` of the real photographs (the smaller ones, by name), or [] where there are none."""
    if not PHOTOS.is_dir():
        return []
    files = [p for p in sorted(PHOTOS.glob("*.jpg")) if p.stat().st_size <= max_bytes]
    return [p.read_bytes() for p in files[:count]]


@contextmanager
def small_disk(folder: Path, size: str) -> Iterator[Path]:
    """A real filesystem of SIZE (a tmpfs: `mount` needs root, as CI has; skipped elsewhere)
    mounted on FOLDER, unmounted afterwards. `grow(folder, size)` frees space on it."""
    folder.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here (needs root): {r.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], capture_output=True)


def grow(folder: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], check=True)
