"""What the trainer's tests share: the truth read straight from the tars, a shard set of
flat-colour images (for the lighting), a locator for random crops (the input back-ends'
tests; no DALI needed), and a tiny shard set for runs of the real trainer whose point is not
learning (exact resume, refusals, the guard): 6 train and 2 val images per class of the
sample data, one shard per split, so an epoch is a few steps."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from pipeline.shard import run
from pipeline.transforms import Normalization
from tests.helpers import read_tar, shard_config
from trainer.data import open_shard_set

PER_CLASS = {"train": 6, "val": 2}  # the tiny shard set's images per class


def truth(out: Path, manifest: dict, split: str) -> dict[str, tuple[int, np.ndarray]]:
    """key -> (label, decoded 256x256 image), read straight from the tars."""
    samples = {}
    for shard in manifest["splits"][split]["shards"]:
        members = dict(read_tar(out / shard["tar"]))
        for name, data in members.items():
            if name.endswith(".jpg"):
                key = name[:-4]
                samples[key] = (int(members[key + ".cls"]), simplejpeg.decode_jpeg(data, colorspace="RGB"))
    return samples


@pytest.fixture(scope="session")
def flat_shards(tmp_path_factory):
    """Flat-colour images: any crop or mirror of one is the same colour, so the train output
    minus the centre output is exactly the lighting shift that image got."""
    root = tmp_path_factory.mktemp("flat")
    rng = np.random.RandomState(0)
    for c in range(2):
        folder = root / "raw" / "train" / f"n0000000{c}"
        folder.mkdir(parents=True)
        for i in range(32):
            colour = tuple(int(v) for v in rng.randint(40, 216, size=3))
            Image.new("RGB", (300, 260), colour).save(folder / f"flat_{c}_{i}.png")
    run(shard_config(root / "raw", root / "shards", workers=1))
    return open_shard_set(root / "shards", 227)


def locate(patch_chw: np.ndarray, image: np.ndarray, norm: Normalization) -> tuple[int, int, bool] | None:
    """Find (top, left, mirrored) of a train crop (lighting off) inside its source image:
    a small probe narrows the candidates (vectorised), the whole patch confirms."""
    crop = patch_chw.shape[1]
    target = patch_chw.transpose(1, 2, 0) * np.asarray(norm.std, np.float32) + np.asarray(norm.mean, np.float32)
    span = image.shape[0] - crop + 1
    probe = target[:2, :8]
    for mirrored in (False, True):
        src = np.ascontiguousarray(image[:, ::-1] if mirrored else image).astype(np.float32)
        windows = np.lib.stride_tricks.sliding_window_view(src, probe.shape)[:span, :span, 0]
        hits = np.argwhere(np.abs(windows - probe).max(axis=(2, 3, 4)) < 0.01)
        for top, left in hits:
            if np.allclose(src[top:top + crop, left:left + crop], target, atol=0.01):
                return int(top), int(image.shape[1] - crop - left) if mirrored else int(left), mirrored
    return None


@pytest.fixture(scope="session")
def tiny_shard_set(sample_root, tmp_path_factory) -> tuple[Path, dict]:
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
