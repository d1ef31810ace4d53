"""The trainer tests' fixtures: a shard set of flat-colour images (for the lighting), and a
tiny shard set for runs of the real trainer whose point is not learning (exact resume,
refusals, the guard): 6 train and 2 val images per class of the sample data, one shard per
split, so an epoch is a few steps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.shard import run
from pipeline.shardset import open_shard_set
from tests.helpers import shard_config
from tests.once import built_once

PER_CLASS = {"train": 6, "val": 2}  # the tiny shard set's images per class


def write_flat_shards(root: Path) -> None:
    rng = np.random.RandomState(0)
    for c in range(2):
        folder = root / "raw" / "train" / f"n0000000{c}"
        folder.mkdir(parents=True)
        for i in range(32):
            colour = tuple(int(v) for v in rng.randint(40, 216, size=3))
            Image.new("RGB", (300, 260), colour).save(folder / f"flat_{c}_{i}.png")
    run(shard_config(root / "raw", root / "shards", workers=1))


@pytest.fixture(scope="session")
def flat_shards(tmp_path_factory):
    """Flat-colour images: any crop or mirror of one is the same colour, so the train output
    minus the centre output is exactly the lighting shift that image got."""
    return open_shard_set(built_once(tmp_path_factory, "flat", write_flat_shards) / "shards", 227)


@pytest.fixture(scope="session")
def tiny_shard_set(sample_root, tmp_path_factory) -> tuple[Path, dict]:
    def write(root: Path) -> None:
        raw = root / "raw"
        for split, n in PER_CLASS.items():
            for folder in sorted(p for p in (sample_root / split).iterdir() if p.is_dir()):
                (raw / split / folder.name).mkdir(parents=True)
                for image in sorted(folder.iterdir())[:n]:
                    shutil.copy(image, raw / split / folder.name / image.name)
        run(shard_config(raw, root / "shards", samples_per_shard=1000))

    out = built_once(tmp_path_factory, "tiny", write) / "shards"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["num_shards"] == 1 and manifest["splits"]["val"]["num_shards"] == 1
    return out, manifest
