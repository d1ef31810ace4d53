"""`python -m pipeline.shard --src /imagenet [--out /data/shards]`: raw ImageNet -> shard set.

--out defaults to $ALEXNET_HOME/shards (pipeline.home), where `python -m trainer.run` reads by
default.

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
from collections.abc import Iterable, Mapping
from dataclasses import replace

from tqdm import tqdm

from pipeline.atomic import exits_cleanly_when_full
from pipeline.cli import Flag, add_fields, given, setup_logging
from pipeline.execute import run_local, run_ray
from pipeline.home import described, shards_dir
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
    log.info(
        "source %s: %s; %d classes (names: %s)%s",
        source.root,
        ", ".join(f"{s}={source.layouts[s]} ({len(source.files[s])} files)" for s in source.files),
        len(source.classes),
        source.names_source,
        f"; --limit {config.limit}" if config.limit else "",
    )
    specs, per_shard = plan(source, config)
    fingerprint = plan_fingerprint(specs)

    existing = find_complete(config.out, fingerprint)
    if existing is not None:
        log.info("%s is already complete for these settings: nothing to do", config.out / MANIFEST)
        return existing
    prepare_output(config.out, specs)

    total = sum(len(s.samples) for s in specs)
    log.info(
        "writing %d shards (%d samples each) with %s",
        len(specs),
        per_shard,
        f"Ray tasks at {config.ray_address}" if config.ray_address else f"{config.workers} worker process(es)",
    )
    results: Iterable[dict] = (
        run_ray(specs, config.ray_address) if config.ray_address else run_local(specs, config.workers)
    )
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
        log.info(
            "%-5s %8d samples in %4d shards, %d skipped",
            split,
            info["num_samples"],
            info["num_shards"],
            info["num_skipped"],
        )
        for item in info["skipped"][:20]:
            log.warning("  skipped %s: %s", item["path"], item["reason"])
        if info["num_skipped"] > 20:
            log.warning("  ... and %d more (all listed in %s)", info["num_skipped"] - 20, MANIFEST)
        if info["num_noted"]:  # kept: stray bytes that hold no image data were ignored
            log.info(
                "  %d kept with a note (listed in %s), e.g. %s: %s",
                info["num_noted"],
                MANIFEST,
                info["notes"][0]["path"],
                info["notes"][0]["note"],
            )
    log.info(
        "done in %.1f s: %.0f img/s processed (%d shard(s) already complete and kept); manifest %s",
        elapsed,
        written_images / elapsed if elapsed > 0 else 0.0,
        resumed,
        config.out / MANIFEST,
    )


def resolve_ray_address(flag: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """As Ray's own tools: the flag if given, else RAY_ADDRESS (which `ray job submit` sets
    for its job), else none; `--ray-address off` forces local processes."""
    if flag is not None:
        return None if flag == NO_RAY else flag
    return environ.get("RAY_ADDRESS") or None


FLAGS = {
    "src": Flag(
        "raw ImageNet root: train/<wnid>/*, and val/<wnid>/* or flat val/* with LOC_val_solution.csv "
        "(Kaggle) or the devkit's ground truth + meta.mat",
        required=True,
    ),
    "out": Flag("output folder for the shard set"),
    "workers": Flag("worker processes (1 = in this process)"),
    "seed": Flag("seed of the global train shuffle"),
    "jpeg_quality": Flag("JPEG quality of the re-encoded 256x256 images", flag="--quality"),
    "samples_per_shard": Flag("samples per shard", flag="--shard-size"),
    "shard_mb": Flag(
        f"target shard size in MB instead (samples per shard estimated from the first {PILOT_SAMPLES} "
        "images, deterministically)"
    ),
    "max_pixels": Flag("images with more pixels are skipped as decompression bombs"),
    "limit": Flag("only the first N files of each split (sorted by path): a quick smoke run", metavar="N"),
    "ray_address": Flag(
        "fan the shards out as Ray tasks on this cluster ('auto', 'ray://host:10001', or 'local' to "
        "start one here); SRC and OUT must be on a filesystem all nodes share"
    ),
    "progress": Flag("no progress bar", flag="--quiet", inverted=True),
}
NOTES = {
    "workers": "all cores",
    "limit": "all files",
    "ray_address": f"$RAY_ADDRESS if set (as `ray job submit` sets it), else local worker processes; "
    f"'{NO_RAY}' forces local processes",
}


def _note(name: str) -> str | None:
    """--help's wording of a default (the home's shard set is read when --help is asked for)."""
    return described(shards_dir()) if name == "out" else NOTES.get(name)


def parse_args(argv: list[str] | None = None) -> ShardConfig:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.shard",
        description="Turn raw ImageNet folders into WebDataset shards of 256x256 centre-cropped JPEGs "
        "(shorter side to 256, centre crop), with DALI-format indexes, RGB stats and a manifest.",
    )
    names = add_fields(p, ShardConfig, only=["src", "out", "workers", "seed", "jpeg_quality"], flags=FLAGS, note=_note)
    names += add_fields(
        p.add_mutually_exclusive_group(),
        ShardConfig,
        only=["samples_per_shard", "shard_mb"],
        flags=FLAGS,
        note=_note,
    )
    names += add_fields(
        p, ShardConfig, only=["max_pixels", "limit", "ray_address", "progress"], flags=FLAGS, note=_note
    )
    values = given(p.parse_args(argv), names)
    if "out" not in values:
        values["out"] = shards_dir()
        log.info("shard set -> %s, the home's (--out to write elsewhere)", described(values["out"]))
    config = ShardConfig(**values)
    if config.samples_per_shard < 1 or config.workers < 1 or not (1 <= config.jpeg_quality <= 100):
        p.error("--shard-size and --workers must be >= 1, --quality in 1..100")
    if config.limit is not None and config.limit < 1:
        p.error("--limit must be >= 1")
    address = resolve_ray_address(config.ray_address)
    if address and config.ray_address is None:
        log.info(
            "RAY_ADDRESS=%s: writing the shards as Ray tasks on that cluster (--ray-address %s for local processes)",
            address,
            NO_RAY,
        )
    return replace(config, ray_address=address)


@exits_cleanly_when_full(
    log,
    "Nothing half-written counts: the shards finished so far are kept, and running the same command "
    "again once there is room writes only the rest",
)
def main(argv: list[str] | None = None) -> int:
    setup_logging()
    config = parse_args(argv)
    try:
        run(config)
    except ShardError as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
