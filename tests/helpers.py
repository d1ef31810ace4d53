"""What several test modules share (fixtures live in the conftest files)."""

from __future__ import annotations

import os
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


def make_checkpoint(shard_set, folder: Path, seed: int = 0, epoch: int = 1, divide_by_std: bool = True) -> Path:
    """A checkpoint written by the trainer's own save function, with freshly initialised weights."""
    import torch

    from pipeline.shardset import open_shard_set
    from trainer.checkpoint import save, shards_meta
    from trainer.model import AlexNet, AlexNetConfig

    out, manifest = shard_set
    shards = open_shard_set(out)
    torch.manual_seed(seed)
    model = AlexNet(AlexNetConfig(num_classes=shards.num_classes, init="kaiming")).eval()
    save(folder, model, classes=manifest["classes"], normalization=shards.normalization(divide_by_std=divide_by_std),
         epoch=epoch, metrics={"val_top1_error": 0.9}, shards=shards_meta(out, manifest), run=folder.parent.name)
    return folder


def register(run: Path, *names: str) -> None:
    """What the trainer does once every worker has persisted a checkpoint: point the run
    folder's latest_checkpoint.json at the newest (atomically)."""
    from trainer.checkpoint import POINTER, pointer_json

    tmp = run / f".{POINTER}.tmp"
    tmp.write_text(pointer_json(names[-1], int(names[-1].rsplit("_", 1)[-1])))
    os.replace(tmp, run / POINTER)
