"""The output folder before a run writes into it: no manifest (the set is incomplete from
here until the new one is renamed into place), no temporaries of killed runs, and no shards
of an earlier plan that would otherwise mix into the set."""

from __future__ import annotations

from pathlib import Path

from pipeline.shardset import MANIFEST, SPLITS, index_path_for, shard_glob
from pipeline.writer import STATE_DIR, ShardSpec


def prepare_output(out: Path, specs: list[ShardSpec]) -> None:
    (out / MANIFEST).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    _clean_temporaries(out)
    _remove_stale(out, specs)


def _clean_temporaries(out: Path) -> None:
    for folder in [out / split for split in SPLITS] + [out / STATE_DIR / split for split in SPLITS] + [out]:
        if folder.is_dir():
            for p in folder.glob(".*.tmp"):
                p.unlink(missing_ok=True)


def _remove_stale(out: Path, specs: list[ShardSpec]) -> None:
    wanted = {s.tar_path for s in specs}
    for split in SPLITS:
        for tar in (out / split).glob(shard_glob(split)) if (out / split).is_dir() else []:
            if tar not in wanted:
                tar.unlink()
                index_path_for(tar).unlink(missing_ok=True)
                (out / STATE_DIR / split / f"{tar.stem}.json").unlink(missing_ok=True)
