"""Contract 1, the shard set: its file names, its format tag, and its one reader.

`python -m pipeline.shard` writes a shard set (pipeline.manifest, pipeline.writer); everyone
else reads it through `open_shard_set` (the trainer's DALI loader, serving's retrieval index,
the benchmarks). The names below are the only place these file names and patterns are spelled.

    OUT/manifest.json                 MANIFEST, written last: no manifest = an incomplete set
    OUT/stats.json                    STATS, train RGB statistics
    OUT/<split>/<shard>.tar + .idx    SPLITS; shard_name(split, index); INDEX_SUFFIX

docs/architecture.md ("Contract 1") documents every field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.transforms import LIGHTING_ALPHA_STD, Lighting, Normalization

MANIFEST = "manifest.json"
STATS = "stats.json"
SPLITS = ("train", "val")
FORMAT = "alexnet-2012/webdataset-shards"
FORMAT_VERSION = 1
SHARD_PREFIX = "imagenet"
TAR_SUFFIX = ".tar"
INDEX_SUFFIX = ".idx"  # DALI's wds2idx index beside each tar


def shard_name(split: str, index: int) -> str:
    """`imagenet-train-000042`: the stem of a shard's .tar and .idx."""
    return f"{SHARD_PREFIX}-{split}-{index:06d}"


def shard_glob(split: str) -> str:
    """Matches every shard tar of `split` (stale ones included) in OUT/<split>/."""
    return f"{SHARD_PREFIX}-{split}-*{TAR_SUFFIX}"


def index_path_for(tar_path: Path) -> Path:
    return tar_path.with_suffix(INDEX_SUFFIX)


class ShardSetError(ValueError):
    """The shard set is missing, incomplete, of another format, or does not fit the model."""


@dataclass(frozen=True)
class ShardSet:
    root: Path
    manifest: dict
    stats: dict | None

    @property
    def num_classes(self) -> int:
        return len(self.manifest["classes"])

    @property
    def image_size(self) -> int:
        return int(self.manifest["image_size"])

    @property
    def jpeg_quality(self) -> int:
        return int(self.manifest["jpeg_quality"])

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    def shards(self, split: str) -> list[dict]:
        """The manifest's entries for `split`: {tar, idx, num_samples, bytes, sha256}, paths
        relative to `root`."""
        if split not in self.manifest["splits"]:
            raise ShardSetError(f"{self.root} has no {split!r} split (has: {', '.join(self.manifest['splits'])})")
        return self.manifest["splits"][split]["shards"]

    def files(self, split: str) -> tuple[list[str], list[str]]:
        """Absolute tar and idx paths of `split`, in manifest order."""
        shards = self.shards(split)
        return [str(self.root / s["tar"]) for s in shards], [str(self.root / s["idx"]) for s in shards]

    def num_samples(self, split: str) -> int:
        self.shards(split)  # a clear error for a split that is not there
        return int(self.manifest["splits"][split]["num_samples"])

    def normalization(self, divide_by_std: bool = False) -> Normalization:
        return Normalization.from_stats(self._stats(), divide_by_std)

    def lighting(self, alpha_std: float = LIGHTING_ALPHA_STD) -> Lighting:
        return Lighting.from_stats(self._stats(), alpha_std)

    def _stats(self) -> dict:
        if self.stats is None:
            raise ShardSetError(f"{self.root} has no {STATS} (it is written with the train split)")
        return self.stats


def open_shard_set(root: Path | str, input_size: int | None = None) -> ShardSet:
    """Read and check a shard set: clear errors for a missing or incomplete set, one of another
    format or format version, and (given `input_size`) images smaller than the model's input."""
    root = Path(root)
    if not root.is_dir():
        raise ShardSetError(f"shard set {root} does not exist (write one with: python -m pipeline.shard)")
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise ShardSetError(
            f"shard set {root} is incomplete: no {MANIFEST} (the sharder writes it last; "
            "rerun python -m pipeline.shard with the same arguments to finish it)"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError as exc:
        raise ShardSetError(f"{manifest_path} is not valid JSON: {exc}") from None
    found = (manifest.get("format"), manifest.get("format_version"))
    if found != (FORMAT, FORMAT_VERSION):
        raise ShardSetError(
            f"{manifest_path} is format {found[0]!r} version {found[1]!r}; this code reads "
            f"{FORMAT!r} version {FORMAT_VERSION} (rewrite the set with this version's "
            "python -m pipeline.shard)"
        )
    for info in manifest["splits"].values():
        for shard in info["shards"]:
            for key in ("tar", "idx"):
                if not (root / shard[key]).is_file():
                    raise ShardSetError(f"shard set {root} is incomplete: {shard[key]} is missing")
    stats_path = root / STATS
    stats = json.loads(stats_path.read_text()) if stats_path.is_file() else None
    shard_set = ShardSet(root=root, manifest=manifest, stats=stats)
    if input_size is not None and input_size > shard_set.image_size:
        raise ShardSetError(
            f"model input {input_size}x{input_size} does not fit the shard set's "
            f"{shard_set.image_size}x{shard_set.image_size} images"
        )
    return shard_set
