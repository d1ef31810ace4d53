"""A tiny shard set for runs of the real trainer whose point is not learning (exact resume,
refusals, the guard): 6 train and 2 val images per class of the sample data, one shard per
split. An epoch is a few steps."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import shard_config

PER_CLASS = {"train": 6, "val": 2}


@pytest.fixture(scope="session")
def tiny_shard_set(sample_root, tmp_path_factory) -> tuple[Path, dict]:
    from pipeline.shard import run

    raw = tmp_path_factory.mktemp("tiny") / "raw"
    for split, n in PER_CLASS.items():
        for folder in sorted(p for p in (sample_root / split).iterdir() if p.is_dir()):
            (raw / split / folder.name).mkdir(parents=True)
            for image in sorted(folder.iterdir())[:n]:
                shutil.copy(image, raw / split / folder.name / image.name)
    out = raw.parent / "shards"
    manifest = run(shard_config(raw, out, samples_per_shard=1000))
    assert manifest["splits"]["train"]["num_shards"] == 1 and manifest["splits"]["val"]["num_shards"] == 1
    return out, manifest
