"""The finished shard set's two documents, written last: stats.json, then manifest.json.

`find_complete` is the other half: a set whose manifest matches the plan and whose files
are all there is complete, and a rerun leaves it untouched. The fields are contract 1
(docs/architecture.md); the names come from pipeline.shardset.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.atomic import write_atomic
from pipeline.layouts import SourceSet
from pipeline.plan import ShardConfig
from pipeline.preprocess import PREPROCESS_VERSION
from pipeline.shardset import FORMAT, FORMAT_VERSION, MANIFEST, STATS, index_path_for
from pipeline.stats import PixelMoments, rgb_stats
from pipeline.writer import ShardSpec


def find_complete(out: Path, fingerprint: str) -> dict | None:
    """The manifest of `out` if it is complete for this plan, else None."""
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


def build_manifest(
    source: SourceSet,
    config: ShardConfig,
    specs: list[ShardSpec],
    records: dict[str, dict],
    per_shard: int,
    fingerprint: str,
) -> dict:
    splits = {}
    for split in source.files:
        shards, skipped = [], [{"path": u.relpath, "reason": u.reason} for u in source.unlabelled.get(split, [])]
        notes = []
        for spec in (s for s in specs if s.split == split):
            rec = records[spec.name]
            skipped.extend(rec["skipped"])
            notes.extend(rec["notes"])
            if rec["num_samples"]:
                tar = spec.tar_path.relative_to(config.out).as_posix()
                shards.append(
                    {
                        "tar": tar,
                        "idx": index_path_for(Path(tar)).as_posix(),
                        "num_samples": rec["num_samples"],
                        "bytes": rec["bytes"],
                        "sha256": rec["sha256"],
                    }
                )
        splits[split] = {
            "layout": source.layouts[split],
            "num_samples": sum(s["num_samples"] for s in shards),
            "num_shards": len(shards),
            "num_skipped": len(skipped),
            "shards": shards,
            "skipped": sorted(skipped, key=lambda d: d["path"]),
            "num_noted": len(notes),
            "notes": sorted(notes, key=lambda d: d["path"]),
        }
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "image_size": config.image_size,
        "jpeg_quality": config.jpeg_quality,
        "preprocess_version": PREPROCESS_VERSION,
        "seed": config.seed,
        "samples_per_shard": per_shard,
        "limit": config.limit,
        "source": {"root": str(source.root), "layouts": source.layouts, "class_names": source.names_source},
        "classes": [c.to_json() for c in source.classes],
        "splits": splits,
        "stats": STATS if "train" in source.files else None,
        "plan_fingerprint": fingerprint,
    }


def write_stats(out: Path, specs: list[ShardSpec], records: dict[str, dict]) -> None:
    """stats.json from the train shards' pixel moments (merged in plan order)."""
    moments = PixelMoments()
    for spec in specs:
        if spec.split == "train":
            moments.merge(PixelMoments.from_json(records[spec.name]["moments"]))
    write_atomic(out / STATS, json.dumps(rgb_stats(moments), indent=2) + "\n")


def write_manifest(out: Path, manifest: dict) -> None:
    write_atomic(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
