"""`python -m pipeline.shard --src /imagenet --out /data/shards`: raw ImageNet -> shard set.

Writes contract 1 of docs/architecture.md (pipeline.shardset): WebDataset tars of 256x256
centre-cropped JPEGs, a DALI .idx per tar, stats.json (train RGB statistics) and
manifest.json LAST. Resumable: rerun the same command after any interruption and it
finishes the job; the result is byte-identical to an uninterrupted run with the same settings.

This module is the command: options, logging, progress. The work is in
pipeline.plan (which sample goes where), pipeline.execute (processes or Ray tasks running
pipeline.writer.write_shard per shard), pipeline.outdir and pipeline.manifest.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from tqdm import tqdm

from pipeline.execute import run_local, run_ray
from pipeline.layouts import LayoutError, detect
from pipeline.manifest import build_manifest, find_complete, write_manifest, write_stats
from pipeline.outdir import prepare_output
from pipeline.plan import PILOT_SAMPLES, ShardConfig, ShardError, limit_source, plan, plan_fingerprint
from pipeline.shardset import MANIFEST

__all__ = ["ShardConfig", "ShardError", "run", "main"]
log = logging.getLogger("pipeline.shard")
NO_RAY = "off"  # --ray-address off: local processes even where RAY_ADDRESS is set


def run(config: ShardConfig) -> dict:
    """Shard config.src into config.out; returns the manifest."""
    t0 = time.perf_counter()
    try:
        source = limit_source(detect(config.src), config.limit)
    except LayoutError as exc:
        raise ShardError(str(exc)) from None
    config.out = config.out.resolve()
    log.info("source %s: %s; %d classes (names: %s)%s", source.root,
             ", ".join(f"{s}={source.layouts[s]} ({len(source.files[s])} files)" for s in source.files),
             len(source.classes), source.names_source, f"; --limit {config.limit}" if config.limit else "")
    specs, per_shard = plan(source, config)
    fingerprint = plan_fingerprint(specs)

    existing = find_complete(config.out, fingerprint)
    if existing is not None:
        log.info("%s is already complete for these settings: nothing to do", config.out / MANIFEST)
        return existing
    prepare_output(config.out, specs)

    total = sum(len(s.samples) for s in specs)
    log.info("writing %d shards (%d samples each) with %s", len(specs), per_shard,
             f"Ray tasks at {config.ray_address}" if config.ray_address else f"{config.workers} worker process(es)")
    results: Iterable[dict] = (run_ray(specs, config.ray_address) if config.ray_address
                               else run_local(specs, config.workers))
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
        write_stats(config.out, specs, records)
    manifest = build_manifest(source, config, specs, records, per_shard, fingerprint)
    write_manifest(config.out, manifest)
    _report(manifest, config, time.perf_counter() - t0, written_images, resumed)
    return manifest


def _report(manifest: dict, config: ShardConfig, elapsed: float, written_images: int, resumed: int) -> None:
    for split, info in manifest["splits"].items():
        log.info("%-5s %8d samples in %4d shards, %d skipped", split, info["num_samples"], info["num_shards"],
                 info["num_skipped"])
        for item in info["skipped"][:20]:
            log.warning("  skipped %s: %s", item["path"], item["reason"])
        if info["num_skipped"] > 20:
            log.warning("  ... and %d more (all listed in %s)", info["num_skipped"] - 20, MANIFEST)
    log.info("done in %.1f s: %.0f img/s processed (%d shard(s) already complete and kept); manifest %s",
             elapsed, written_images / elapsed if elapsed > 0 else 0.0, resumed, config.out / MANIFEST)


def resolve_ray_address(flag: str | None, environ: dict[str, str] = os.environ) -> str | None:
    """As Ray's own tools: the flag if given, else RAY_ADDRESS (which `ray job submit` sets
    for its job), else none; `--ray-address off` forces local processes."""
    if flag is not None:
        return None if flag == NO_RAY else flag
    return environ.get("RAY_ADDRESS") or None


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
    p.add_argument("--limit", type=int, default=None,
                   help="only the first N files of each split (sorted by path): a quick smoke run")
    p.add_argument("--ray-address", default=None,
                   help="fan the shards out as Ray tasks on this cluster ('auto', 'ray://host:10001', or "
                        "'local' to start one here); SRC and OUT must be on a filesystem all nodes share. "
                        f"Default: $RAY_ADDRESS if set (as `ray job submit` sets it), else local worker "
                        f"processes; '{NO_RAY}' forces local processes")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    if a.samples_per_shard < 1 or a.workers < 1 or not (1 <= a.jpeg_quality <= 100):
        p.error("--shard-size and --workers must be >= 1, --quality in 1..100")
    if a.limit is not None and a.limit < 1:
        p.error("--limit must be >= 1")
    address = resolve_ray_address(a.ray_address)
    if address and a.ray_address is None:
        log.info("RAY_ADDRESS=%s: writing the shards as Ray tasks on that cluster (--ray-address %s for "
                 "local processes)", address, NO_RAY)
    return ShardConfig(src=a.src, out=a.out, workers=a.workers, seed=a.seed, jpeg_quality=a.jpeg_quality,
                       samples_per_shard=a.samples_per_shard, shard_mb=a.shard_mb, max_pixels=a.max_pixels,
                       limit=a.limit, ray_address=address, progress=not a.quiet)


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
