"""/similar's index: what a network service adds to trainer.retrieval (the fc7 index, its
search and the shard-set reading it shares with the paper's Figure 4): folders of images,
which get the same preprocessing as /predict, and confinement to allowed roots.

Every file read is confined to `roots` when given: the path is resolved (symlinks and
`..` included) and must lie under one of them. A folder's image that resolves outside is
skipped with a warning; a shard set whose manifest names a tar outside is refused whole
(`OutsideRoots`) before anything is read.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from pipeline.preprocess import ImageError
from pipeline.shardset import MANIFEST, open_shard_set
from serving.settings import Settings
from trainer.retrieval import Index, Item, embed_all, shard_samples

log = logging.getLogger("serving.retrieval")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


class OutsideRoots(PermissionError):
    """A path that resolves outside the allowed roots."""


def inside(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def confine(path: Path, roots: Sequence[Path]) -> Path:
    """`path` resolved (symlinks followed); OutsideRoots unless it lies under a root."""
    resolved = Path(path).resolve()
    if not inside(resolved, [Path(r).resolve() for r in roots]):
        raise OutsideRoots(f"{path} is outside the allowed roots")
    return resolved


def shard_tars(root: Path, split: str, roots: Sequence[Path] | None = None) -> list[tuple[str, Path]]:
    """(name in the manifest, resolved path) of every tar of `split`, read through contract 1's
    reader (pipeline.shardset: ShardSetError for a missing split or an incomplete set);
    OutsideRoots if any escapes."""
    shards = open_shard_set(root).shards(split)
    allowed = list(roots) if roots is not None else [root]
    return [(shard["tar"], confine(root / shard["tar"], allowed)) for shard in shards]


def _folder_items(folder: Path, predictor, roots: Sequence[Path]) -> Iterator[Item]:
    allowed = [Path(r).resolve() for r in roots]
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        if not inside(path.resolve(), allowed):
            log.warning("not indexed: %s resolves outside the allowed roots", path)
            continue
        try:
            yield path.stem, str(path.relative_to(folder)), predictor.preprocess(path.read_bytes())
        except ImageError as exc:
            log.warning("not indexed: %s: %s", path, exc.reason)


def build_index(
    path: Path,
    predictor,
    split: str = "val",
    batch: int | None = None,
    limit: int | None = None,
    roots: Sequence[Path] | None = None,
    stop: threading.Event | None = None,
) -> Index:
    """Embed every image under `path` (a folder, or a shard set's `split`), `batch` images per
    forward pass (default: the service's max_batch), reading only under `roots` (default:
    `path` itself). Raises Cancelled once `stop` is set."""
    batch = batch or Settings.model_construct().max_batch
    path = Path(path).resolve()
    roots = list(roots) if roots is not None else [path]
    if (path / MANIFEST).is_file():
        items = shard_samples(shard_tars(path, split, roots), predictor.input_size, predictor.norm)
    elif path.is_dir():
        items = _folder_items(path, predictor, roots)
    else:
        raise FileNotFoundError(f"nothing to index at {path}")
    return embed_all(
        path, items, lambda crops: predictor.forward(crops)[1], batch=batch, split=split, limit=limit, stop=stop
    )
