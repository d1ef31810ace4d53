"""Image retrieval by fc7 distance (paper section 6.1, Figure 4): an index of a model's
fc7 embeddings, Euclidean nearest-neighbour search in it, and the retrieval sheet.

One home for what the figures and serving's /similar share: `Index`, `shard_samples` (a
shard set's 256x256 samples, decoded as the trainer decodes them, given only the eval crop)
and `embed_all` (batched embedding, stoppable). Serving adds what a network service needs
around it (folders of uploads, allowed roots, a background build); this module reads what it
is given.

    retrieval_sheet(checkpoint, shards, out)   # Figure 4: val queries and their neighbours
"""

from __future__ import annotations

import logging
import tarfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.atomic import replacing
from pipeline.sharded import decode_jpeg
from pipeline.transforms import Normalization, eval_crops

log = logging.getLogger("trainer.retrieval")
Item = tuple[str, str, np.ndarray]  # (key, origin, eval crops (1, 3, S, S) float32)


class Cancelled(Exception):
    """The build was stopped (a newer one replaced it)."""


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
        # Computed directly, not through the |x|^2 + |y|^2 - 2xy shortcut, whose rounding puts an
        # image's distance to its own copy at ~0.03 instead of 0.
        distances = torch.cdist(
            query.reshape(1, -1).float(), self.vectors, compute_mode="donot_use_mm_for_euclid_dist"
        )[0]
        k = min(k, len(self.keys))
        values, indices = distances.topk(k, largest=False)
        return [
            {"key": self.keys[i], "source": self.origins[i], "distance": float(v)}
            for v, i in zip(values.tolist(), indices.tolist())
        ]


def shard_samples(tars: Iterable[tuple[str, Path]], input_size: int, norm: Normalization) -> Iterator[Item]:
    """Every sample of the given (name, path) tars, centre-cropped and normalised."""
    for name, path in tars:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".jpg"):
                    data = tar.extractfile(member)
                    assert data is not None  # a regular file
                    pixels = decode_jpeg(data.read())
                    key = member.name[:-4]
                    yield key, f"{name}:{key}", eval_crops(pixels, input_size, norm)


def embed_all(
    root: Path,
    items: Iterable[Item],
    embed: Callable[[np.ndarray], torch.Tensor],
    *,
    batch: int,
    split: str = "val",
    limit: int | None = None,
    stop: threading.Event | None = None,
) -> Index:
    """Embed `items` `batch` at a time with `embed` ((N, 3, S, S) -> (N, D)), at most `limit`
    of them. Raises Cancelled once `stop` is set, ValueError if there was nothing to embed."""
    keys, origins, chunks = [], [], []
    pending: list[np.ndarray] = []

    def flush():
        if pending:
            chunks.append(embed(np.concatenate(pending)))
            pending.clear()

    for key, origin, crops in items:
        if stop is not None and stop.is_set():
            raise Cancelled(f"indexing {root} was stopped")
        keys.append(key)
        origins.append(origin)
        pending.append(crops)
        if len(pending) >= batch:
            flush()
        if limit and len(keys) >= limit:
            break
    flush()
    if not keys:
        raise ValueError(f"no images found to index in {root.name}")
    log.info("indexed %d images from %s", len(keys), root)
    return Index(root=root, keys=keys, origins=origins, vectors=torch.cat(chunks), split=split)


def figure4_rows(train: Index, val: Index, queries: int, neighbours: int) -> list[tuple[str, list[str]]]:
    """The paper's Figure 4: `queries` validation images, evenly spread, each with the
    `neighbours` training images nearest to it by fc7 distance; as origins ("tar:key")."""
    step = max(1, len(val.keys) // queries)
    return [
        (val.origins[q], [f["source"] for f in train.nearest(val.vectors[q], neighbours)])
        for q in range(0, step * queries, step)[:queries]
    ]


def retrieval_sheet(
    checkpoint: Path, shards: Path, out: Path, queries: int = 5, neighbours: int = 6, thumb: int = 96, batch: int = 32
) -> Path:
    """Figure 4: each row a validation image and the training images nearest to it by fc7
    distance (the paper's query and search sets)."""
    from PIL import Image

    from pipeline.shardset import open_shard_set
    from trainer.checkpoint import load_model

    model, meta = load_model(checkpoint)
    shard_set = open_shard_set(shards)
    tars = {
        split: [(s["tar"], shard_set.root / s["tar"]) for s in shard_set.shards(split)] for split in ("train", "val")
    }

    @torch.no_grad()
    def embed(crops: np.ndarray) -> torch.Tensor:
        return model.forward_with_embedding(torch.from_numpy(crops))[1].float()

    train, val = (
        embed_all(
            shard_set.root,
            shard_samples(tars[split], meta.input_size, meta.normalization),
            embed,
            batch=batch,
            split=split,
        )
        for split in ("train", "val")
    )
    rows = figure4_rows(train, val, queries, neighbours)
    wanted = {origin for query, found in rows for origin in (query, *found)}
    pixels = {}
    for name, path in tars["train"] + tars["val"]:
        with tarfile.open(path) as tar:
            for member in tar:
                origin = f"{name}:{member.name[:-4]}"
                if member.name.endswith(".jpg") and origin in wanted:
                    data = tar.extractfile(member)
                    assert data is not None  # the sharder writes regular files only
                    img = Image.open(data).convert("RGB").resize((thumb, thumb))
                    pixels[origin] = np.asarray(img)
    sheet = []
    for query, found in rows:
        gap = np.full((thumb, 8, 3), 255, dtype=np.uint8)
        row = [pixels[query], np.full((thumb, 16, 3), 255, dtype=np.uint8)]
        for origin in found:
            row += [pixels[origin], gap]
        sheet += [np.concatenate(row, axis=1), np.full((8, sum(r.shape[1] for r in row), 3), 255, dtype=np.uint8)]
    with replacing(out, suffix=out.suffix) as tmp:
        Image.fromarray(np.concatenate(sheet, axis=0)).save(tmp)
    return out
