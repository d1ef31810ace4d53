"""Planning a run: which sample goes into which shard, decided before any image is read.

The plan is a pure function of the source listing and the settings (`--seed`, shard size,
image size, quality, `--limit`, the preprocessing version): the same inputs always give the
same shards, whatever executes them (pipeline.execute) and however often the run is
interrupted. That is what makes the output byte-identical across worker counts and resumes.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.layouts import SourceSet
from pipeline.preprocess import (
    DEFAULT_JPEG_QUALITY,
    DEFAULT_MAX_PIXELS,
    OUTPUT_SIZE,
    ImageError,
    encode_jpeg,
    prepare_image,
)
from pipeline.shardset import SPLITS
from pipeline.wds import unique_keys
from pipeline.writer import Sample, ShardSpec

# 2048 samples of ~25-30 KB: ~55 MB tars, ~626 train + 25 val shards for ILSVRC-2012.
# Big enough for fast sequential reads, small enough that a restart loses little work and
# that hundreds of data-parallel workers each get whole shards.
DEFAULT_SAMPLES_PER_SHARD = 2048
PILOT_SAMPLES = 64  # for --shard-mb: images encoded up front to estimate bytes per sample
TAR_OVERHEAD_PER_SAMPLE = 3 * 512 + 2 * 512  # three headers + padding, roughly


class ShardError(RuntimeError):
    """A run that cannot start or finish; the message says why."""


@dataclass
class ShardConfig:
    src: Path
    out: Path
    workers: int = os.cpu_count() or 1
    seed: int = 0
    image_size: int = OUTPUT_SIZE
    jpeg_quality: int = DEFAULT_JPEG_QUALITY
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD
    shard_mb: float | None = None  # if set, overrides samples_per_shard (estimated, see above)
    max_pixels: int = DEFAULT_MAX_PIXELS
    limit: int | None = None  # only the first N files of each split (a smoke run)
    ray_address: str | None = None  # None: local worker processes (the CLI resolves RAY_ADDRESS)
    progress: bool = True  # tqdm bar on stderr


def limit_source(source: SourceSet, limit: int | None) -> SourceSet:
    """The first `limit` files of each split, in the listing's (sorted) order."""
    if limit is None:
        return source
    return replace(source, files={split: files[:limit] for split, files in source.files.items()})


def _plan_split(source: SourceSet, split: str, config: ShardConfig, samples_per_shard: int) -> list[ShardSpec]:
    files = source.files[split]
    labels = source.label_of()
    keys = unique_keys([f.relpath for f in files])
    samples = [Sample(f.relpath, k, labels[f.wnid], f.wnid) for f, k in zip(files, keys)]
    if split == "train":
        # Global shuffle before cutting into shards, so every shard holds a mix of classes
        # (the paper's SGD draws batches across classes). Python's Mersenne Twister shuffle
        # is stable across versions: same seed, same order, same bytes.
        random.Random(config.seed).shuffle(samples)
    return [
        ShardSpec(
            split=split,
            index=i,
            samples=tuple(samples[start : start + samples_per_shard]),
            src_root=str(source.root),
            out_dir=str(config.out),
            image_size=config.image_size,
            jpeg_quality=config.jpeg_quality,
            max_pixels=config.max_pixels,
            with_stats=(split == "train"),
        )
        for i, start in enumerate(range(0, len(samples), samples_per_shard))
    ]


def _samples_per_shard_for_bytes(source: SourceSet, config: ShardConfig) -> int:
    """--shard-mb: estimate bytes per sample from the first PILOT_SAMPLES files (a fixed,
    deterministic choice, so the plan, and so the bytes, are reproducible)."""
    assert config.shard_mb is not None
    split = "train" if "train" in source.files else next(iter(source.files))
    sizes = []
    for f in source.files[split][:PILOT_SAMPLES]:
        try:
            data = (source.root / f.relpath).read_bytes()
            prepared = prepare_image(data, size=config.image_size, max_pixels=config.max_pixels)
        except (ImageError, OSError):
            continue
        sizes.append(len(encode_jpeg(prepared.pixels, config.jpeg_quality)) + TAR_OVERHEAD_PER_SAMPLE + 80)
    if not sizes:
        return config.samples_per_shard
    per_sample = sum(sizes) / len(sizes)
    return max(1, int(config.shard_mb * 1e6 // per_sample))


def plan(source: SourceSet, config: ShardConfig) -> tuple[list[ShardSpec], int]:
    """Every shard of the run, train first; and the samples per shard used."""
    per_shard = config.samples_per_shard
    if config.shard_mb is not None:
        per_shard = _samples_per_shard_for_bytes(source, config)
    specs = [
        spec for split in SPLITS if split in source.files for spec in _plan_split(source, split, config, per_shard)
    ]
    return specs, per_shard


def plan_fingerprint(specs: list[ShardSpec]) -> str:
    h = hashlib.sha256()
    for spec in specs:
        h.update(spec.fingerprint().encode())
    return h.hexdigest()
