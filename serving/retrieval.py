"""Image retrieval by fc7 distance (paper 6.1): an index of embeddings for a folder of
images or a shard set, and Euclidean nearest-neighbour search in it.

A folder's images go through the same preprocessing as /predict; a shard set's samples
are already 256x256 (decoded as the trainer decodes them) and only get the eval crop.
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import simplejpeg
import torch

from pipeline.preprocess import ImageError
from pipeline.shardset import MANIFEST, open_shard_set
from pipeline.transforms import eval_crops

log = logging.getLogger("serving.retrieval")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


@dataclass
class Index:
    source: str
    keys: list[str]
    origins: list[str]  # file path, or "shard.tar:key"
    vectors: torch.Tensor  # (N, 4096) float32
    split: str = "val"  # of a shard set (ignored for a folder)

    def nearest(self, query: torch.Tensor, k: int) -> list[dict]:
        distances = torch.cdist(query.reshape(1, -1).float(), self.vectors)[0]
        k = min(k, len(self.keys))
        values, indices = distances.topk(k, largest=False)
        return [{"key": self.keys[i], "source": self.origins[i], "distance": float(v)}
                for v, i in zip(values.tolist(), indices.tolist())]


def _folder_items(folder: Path, predictor) -> Iterator[tuple[str, str, np.ndarray | None]]:
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        try:
            yield path.stem, str(path), predictor.preprocess(path.read_bytes())
        except ImageError as exc:
            log.warning("not indexed: %s: %s", path, exc.reason)


def _shard_items(root: Path, predictor, split: str) -> Iterator[tuple[str, str, np.ndarray | None]]:
    for shard in open_shard_set(root).shards(split):
        with tarfile.open(root / shard["tar"]) as tar:
            for member in tar:
                if member.name.endswith(".jpg"):
                    pixels = simplejpeg.decode_jpeg(tar.extractfile(member).read(), colorspace="RGB")
                    key = member.name[:-4]
                    yield key, f"{shard['tar']}:{key}", eval_crops(pixels, predictor.input_size, predictor.norm)


def build_index(path: Path, predictor, split: str = "val", batch: int = 32, limit: int | None = None) -> Index:
    """Embed every image under `path` (a folder, or a shard set's `split`)."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        items = _shard_items(path, predictor, split)
    elif path.is_dir():
        items = _folder_items(path, predictor)
    else:
        raise FileNotFoundError(f"nothing to index at {path}")
    keys, origins, chunks, pending = [], [], [], []

    def flush():
        if pending:
            _, emb = predictor.forward(np.concatenate(pending))
            chunks.append(emb)
            pending.clear()

    for key, origin, crops in items:
        keys.append(key)
        origins.append(origin)
        pending.append(crops)
        if len(pending) >= batch:
            flush()
        if limit and len(keys) >= limit:
            break
    flush()
    if not keys:
        raise ValueError(f"no images found to index at {path}")
    log.info("indexed %d images from %s", len(keys), path)
    return Index(source=str(path), keys=keys, origins=origins, vectors=torch.cat(chunks), split=split)
