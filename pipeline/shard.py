"""`python -m pipeline.shard --src /imagenet --out /data/shards`: raw ImageNet -> shard set.

Writes contract 1 of docs/architecture.md: WebDataset tars of 256x256 centre-cropped JPEGs,
a DALI .idx per tar, stats.json (train RGB statistics) and manifest.json LAST. Resumable:
rerun the same command after any interruption and it finishes the job; the result is
byte-identical to an uninterrupted run with the same settings.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from pipeline.layouts import LayoutError, SourceSet, detect
from pipeline.preprocess import (DEFAULT_JPEG_QUALITY, DEFAULT_MAX_PIXELS, OUTPUT_SIZE, ImageError, encode_jpeg,
                                 prepare_image)
from pipeline.shardset import FORMAT, FORMAT_VERSION, MANIFEST, SPLITS, STATS, index_path_for, shard_glob
from pipeline.stats import PixelMoments, rgb_stats
from pipeline.writer import STATE_DIR, Sample, ShardSpec, write_atomic, write_shard
from pipeline.wds import unique_keys

log = logging.getLogger("pipeline.shard")

# 2048 samples of ~25-30 KB: ~55 MB tars, ~626 train + 25 val shards for ILSVRC-2012.
# Big enough for fast sequential reads, small enough that a restart loses little work and
# that hundreds of data-parallel workers each get whole shards.
DEFAULT_SAMPLES_PER_SHARD = 2048
PILOT_SAMPLES = 64  # for --shard-mb: images encoded up front to estimate bytes per sample
TAR_OVERHEAD_PER_SAMPLE = 3 * 512 + 2 * 512  # three headers + padding, roughly


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
    ray_address: str | None = None
    progress: bool = True  # tqdm bar on stderr


class ShardError(RuntimeError):
    pass


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
        ShardSpec(split=split, index=i, samples=tuple(samples[start:start + samples_per_shard]),
                  src_root=str(source.root), out_dir=str(config.out), image_size=config.image_size,
                  jpeg_quality=config.jpeg_quality, max_pixels=config.max_pixels,
                  with_stats=(split == "train"))
        for i, start in enumerate(range(0, len(samples), samples_per_shard))
    ]


def _samples_per_shard_for_bytes(source: SourceSet, config: ShardConfig) -> int:
    """--shard-mb: estimate bytes per sample from the first PILOT_SAMPLES files (a fixed,
    deterministic choice, so the plan, and so the bytes, are reproducible)."""
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
    per_shard = config.samples_per_shard
    if config.shard_mb is not None:
        per_shard = _samples_per_shard_for_bytes(source, config)
    specs = [spec for split in SPLITS if split in source.files
             for spec in _plan_split(source, split, config, per_shard)]
    return specs, per_shard


def _plan_fingerprint(specs: list[ShardSpec]) -> str:
    h = hashlib.sha256()
    for spec in specs:
        h.update(spec.fingerprint().encode())
    return h.hexdigest()


def _run_local(specs: list[ShardSpec], workers: int) -> Iterator[dict]:
    if workers <= 1:
        yield from map(write_shard, specs)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # spawn: no inherited locks or threads from the parent, the same on every platform.
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(write_shard, s) for s in specs]
        for fut in as_completed(futures):
            yield fut.result()


def _run_ray(specs: list[ShardSpec], address: str) -> Iterator[dict]:
    """The same write_shard, as one Ray task per shard. SRC and OUT must be visible at the
    same paths on every node (a shared filesystem)."""
    try:
        import ray
    except ImportError as exc:
        raise ShardError("--ray-address needs Ray: pip install 'alexnet-2012[cluster]'") from exc
    import pipeline

    started_here = not ray.is_initialized()
    if started_here:
        # py_modules ships this package to the cluster, so its nodes need only the dependencies.
        ray.init(address=address, runtime_env={"py_modules": [os.path.dirname(pipeline.__file__)]},
                 log_to_driver=False)
    try:
        remote = ray.remote(num_cpus=1, max_retries=3)(write_shard)
        pending = [remote.remote(s) for s in specs]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
    finally:
        if started_here:
            ray.shutdown()


def _clean_temporaries(out: Path) -> None:
    for folder in [out / split for split in SPLITS] + [out / STATE_DIR / split for split in SPLITS] + [out]:
        if folder.is_dir():
            for p in folder.glob(".*.tmp"):
                p.unlink(missing_ok=True)


def _remove_stale(out: Path, specs: list[ShardSpec]) -> None:
    """Shards left by an earlier run with another plan would otherwise mix into the set."""
    wanted = {s.tar_path for s in specs}
    for split in SPLITS:
        for tar in (out / split).glob(shard_glob(split)) if (out / split).is_dir() else []:
            if tar not in wanted:
                tar.unlink()
                index_path_for(tar).unlink(missing_ok=True)
                (out / STATE_DIR / split / f"{tar.stem}.json").unlink(missing_ok=True)


def _existing_complete(out: Path, fingerprint: str) -> dict | None:
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("plan_fingerprint") != fingerprint:
        return None
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            tar = out / shard["tar"]
            if not tar.is_file() or tar.stat().st_size != shard["bytes"] or not (out / shard["idx"]).is_file():
                return None
    return manifest


def build_manifest(source: SourceSet, config: ShardConfig, specs: list[ShardSpec], records: dict[str, dict],
                   per_shard: int, fingerprint: str) -> dict:
    splits = {}
    for split in source.files:
        shards, skipped = [], [{"path": u.relpath, "reason": u.reason} for u in source.unlabelled.get(split, [])]
        for spec in (s for s in specs if s.split == split):
            rec = records[spec.name]
            skipped.extend(rec["skipped"])
            if rec["num_samples"]:
                tar = spec.tar_path.relative_to(config.out).as_posix()
                shards.append({"tar": tar, "idx": index_path_for(Path(tar)).as_posix(),
                               "num_samples": rec["num_samples"], "bytes": rec["bytes"], "sha256": rec["sha256"]})
        splits[split] = {"layout": source.layouts[split], "num_samples": sum(s["num_samples"] for s in shards),
                         "num_shards": len(shards), "num_skipped": len(skipped),
                         "shards": shards, "skipped": sorted(skipped, key=lambda d: d["path"])}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "image_size": config.image_size,
        "jpeg_quality": config.jpeg_quality,
        "seed": config.seed,
        "samples_per_shard": per_shard,
        "source": {"root": str(source.root), "layouts": source.layouts, "class_names": source.names_source},
        "classes": [c.to_json() for c in source.classes],
        "splits": splits,
        "stats": STATS if "train" in source.files else None,
        "plan_fingerprint": fingerprint,
    }


def run(config: ShardConfig) -> dict:
    """Shard config.src into config.out; returns the manifest."""
    t0 = time.perf_counter()
    try:
        source = detect(config.src)
    except LayoutError as exc:
        raise ShardError(str(exc)) from None
    config.out = config.out.resolve()
    log.info("source %s: %s; %d classes (names: %s)", source.root,
             ", ".join(f"{s}={source.layouts[s]} ({len(source.files[s])} files)" for s in source.files),
             len(source.classes), source.names_source)
    specs, per_shard = plan(source, config)
    fingerprint = _plan_fingerprint(specs)

    existing = _existing_complete(config.out, fingerprint)
    if existing is not None:
        log.info("%s is already complete for these settings: nothing to do", config.out / MANIFEST)
        return existing
    # From here until the new manifest is renamed into place, the set is incomplete.
    (config.out / MANIFEST).unlink(missing_ok=True)
    config.out.mkdir(parents=True, exist_ok=True)
    _clean_temporaries(config.out)
    _remove_stale(config.out, specs)

    total = sum(len(s.samples) for s in specs)
    log.info("writing %d shards (%d samples each) with %s", len(specs), per_shard,
             f"Ray at {config.ray_address}" if config.ray_address else f"{config.workers} worker process(es)")
    results: Iterable[dict] = (_run_ray(specs, config.ray_address) if config.ray_address
                               else _run_local(specs, config.workers))
    records: dict[str, dict] = {}
    resumed = written_images = 0
    with tqdm(total=total, unit="img", desc="sharding", disable=not config.progress, dynamic_ncols=True) as bar:
        for rec in results:
            records[rec["name"]] = rec
            handled = rec["num_samples"] + len(rec["skipped"])
            if rec.pop("resumed"):
                resumed += 1
            else:
                written_images += handled
            bar.update(handled)
            bar.set_postfix(skipped=sum(len(r["skipped"]) for r in records.values()), refresh=False)

    if "train" in source.files:
        moments = PixelMoments()
        for spec in specs:
            if spec.split == "train":
                moments.merge(PixelMoments.from_json(records[spec.name]["moments"]))
        write_atomic(config.out / STATS, (json.dumps(rgb_stats(moments), indent=2) + "\n").encode())
    manifest = build_manifest(source, config, specs, records, per_shard, fingerprint)
    write_atomic(config.out / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())

    elapsed = time.perf_counter() - t0
    for split, info in manifest["splits"].items():
        log.info("%-5s %8d samples in %4d shards, %d skipped", split, info["num_samples"], info["num_shards"],
                 info["num_skipped"])
        for item in info["skipped"][:20]:
            log.warning("  skipped %s: %s", item["path"], item["reason"])
        if info["num_skipped"] > 20:
            log.warning("  ... and %d more (all listed in %s)", info["num_skipped"] - 20, MANIFEST)
    log.info("done in %.1f s: %.0f img/s processed (%d shard(s) already complete and kept); manifest %s",
             elapsed, written_images / elapsed if elapsed > 0 else 0.0, resumed, config.out / MANIFEST)
    return manifest


def parse_args(argv: list[str] | None = None) -> ShardConfig:
    d = ShardConfig(src=Path("."), out=Path("."))
    p = argparse.ArgumentParser(
        prog="python -m pipeline.shard",
        description="Turn raw ImageNet folders into WebDataset shards of 256x256 centre-cropped JPEGs "
                    "(shorter side to 256, centre crop), with DALI indexes, RGB stats and a manifest.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--src", type=Path, required=True,
                   help="raw ImageNet root: train/<wnid>/*, and val/<wnid>/* or flat val/* with "
                        "LOC_val_solution.csv (Kaggle) or the devkit's ground truth + meta.mat")
    p.add_argument("--out", type=Path, required=True, help="output folder for the shard set")
    p.add_argument("--workers", type=int, default=d.workers, help="worker processes (1 = in this process)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the global train shuffle")
    p.add_argument("--quality", dest="jpeg_quality", type=int, default=d.jpeg_quality,
                   help="JPEG quality of the re-encoded 256x256 images")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--shard-size", dest="samples_per_shard", type=int, default=d.samples_per_shard,
                      help="samples per shard")
    size.add_argument("--shard-mb", type=float, default=None,
                      help="target shard size in MB instead (samples per shard estimated from the "
                           f"first {PILOT_SAMPLES} images, deterministically)")
    p.add_argument("--max-pixels", type=int, default=d.max_pixels,
                   help="images with more pixels are skipped as decompression bombs")
    p.add_argument("--ray-address", default=None,
                   help="fan the shards out as Ray tasks on this cluster ('auto', 'ray://host:10001', or "
                        "'local' to start one here); SRC and OUT must be on a filesystem all nodes share")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    if a.samples_per_shard < 1 or a.workers < 1 or not (1 <= a.jpeg_quality <= 100):
        p.error("--shard-size and --workers must be >= 1, --quality in 1..100")
    cfg = ShardConfig(src=a.src, out=a.out, workers=a.workers, seed=a.seed, jpeg_quality=a.jpeg_quality,
                      samples_per_shard=a.samples_per_shard, shard_mb=a.shard_mb, max_pixels=a.max_pixels,
                      ray_address=a.ray_address, progress=not a.quiet)
    return cfg


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = parse_args(argv)
    try:
        run(config)
    except ShardError as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
