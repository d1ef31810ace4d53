"""Image retrieval by fc7 distance (paper 6.1): an index of embeddings for a folder of
images or a shard set, and Euclidean nearest-neighbour search in it.

A folder's images go through the same preprocessing as /predict; a shard set's samples
are already 256x256 (decoded as the trainer decodes them) and only get the eval crop.

Every file read is confined to `roots` when given: the path is resolved (symlinks and
`..` included) and must lie under one of them. A folder's image that resolves outside is
skipped with a warning; a shard set whose manifest names a tar outside is refused whole
(`OutsideRoots`) before anything is read.
"""

from __future__ import annotations

import logging
import tarfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import simplejpeg
import torch

from pipeline.preprocess import ImageError
from pipeline.shardset import MANIFEST, open_shard_set
from pipeline.transforms import eval_crops
from serving.settings import Settings

log = logging.getLogger("serving.retrieval")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


class OutsideRoots(PermissionError):
    """A path that resolves outside the allowed roots."""


class Cancelled(Exception):
    """The build was stopped (a newer one replaced it)."""


def inside(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def confine(path: Path, roots: Sequence[Path]) -> Path:
    """`path` resolved (symlinks followed); OutsideRoots unless it lies under a root."""
    resolved = Path(path).resolve()
    if not inside(resolved, [Path(r).resolve() for r in roots]):
        raise OutsideRoots(f"{path} is outside the allowed roots")
    return resolved


@dataclass
class Index:
    root: Path  # what was indexed (server side: never shown to clients)
    keys: list[str]
    origins: list[str]  # file path relative to root, or "shard.tar:key"
    vectors: torch.Tensor  # (N, 4096) float32
    split: str = "val"  # of a shard set (ignored for a folder)

    @property
    def source(self) -> str:
        return self.root.name

    def nearest(self, query: torch.Tensor, k: int) -> list[dict]:
        distances = torch.cdist(query.reshape(1, -1).float(), self.vectors)[0]
        k = min(k, len(self.keys))
        values, indices = distances.topk(k, largest=False)
        return [{"key": self.keys[i], "source": self.origins[i], "distance": float(v)}
                for v, i in zip(values.tolist(), indices.tolist())]


def shard_tars(root: Path, split: str, roots: Sequence[Path] | None = None) -> list[tuple[str, Path]]:
    """(name in the manifest, resolved path) of every tar of `split`, read through contract 1's
    reader (pipeline.shardset: ShardSetError for a missing split or an incomplete set);
    OutsideRoots if any escapes."""
    shards = open_shard_set(root).shards(split)
    allowed = list(roots) if roots is not None else [root]
    return [(shard["tar"], confine(root / shard["tar"], allowed)) for shard in shards]


def _folder_items(folder: Path, predictor, roots: Sequence[Path]) -> Iterator[tuple[str, str, np.ndarray]]:
    allowed = [Path(r).resolve() for r in roots]
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        if not inside(path.resolve(), allowed):
            log.warning("not indexed: %s resolves outside the allowed roots", path)
            continue
        try:
            yield path.stem, str(path.relative_to(folder)), predictor.preprocess(path.read_bytes())
        except ImageError as exc:
            log.warning("not indexed: %s: %s", path, exc.reason)


def _shard_items(tars: list[tuple[str, Path]], predictor) -> Iterator[tuple[str, str, np.ndarray]]:
    for name, path in tars:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".jpg"):
                    pixels = simplejpeg.decode_jpeg(tar.extractfile(member).read(), colorspace="RGB")
                    key = member.name[:-4]
                    yield key, f"{name}:{key}", eval_crops(pixels, predictor.input_size, predictor.norm)


def build_index(path: Path, predictor, split: str = "val", batch: int | None = None, limit: int | None = None,
                roots: Sequence[Path] | None = None, stop: threading.Event | None = None) -> Index:
    """Embed every image under `path` (a folder, or a shard set's `split`), `batch` images per
    forward pass (default: the service's max_batch), reading only under `roots` (default:
    `path` itself). Raises Cancelled once `stop` is set."""
    batch = batch or Settings.model_construct().max_batch
    path = Path(path).resolve()
    roots = list(roots) if roots is not None else [path]
    if (path / MANIFEST).is_file():
        items = _shard_items(shard_tars(path, split, roots), predictor)
    elif path.is_dir():
        items = _folder_items(path, predictor, roots)
    else:
        raise FileNotFoundError(f"nothing to index at {path}")
    keys, origins, chunks, pending = [], [], [], []

    def flush():
        if pending:
            _, emb = predictor.forward(np.concatenate(pending))
            chunks.append(emb)
            pending.clear()

    for key, origin, crops in items:
        if stop is not None and stop.is_set():
            raise Cancelled(f"indexing {path} was stopped")
        keys.append(key)
        origins.append(origin)
        pending.append(crops)
        if len(pending) >= batch:
            flush()
        if limit and len(keys) >= limit:
            break
    flush()
    if not keys:
        raise ValueError(f"no images found to index in {path.name}")
    log.info("indexed %d images from %s", len(keys), path)
    return Index(root=path, keys=keys, origins=origins, vectors=torch.cat(chunks), split=split)
