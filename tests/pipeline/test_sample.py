"""`pipeline.sample`: deterministic, ImageNet-shaped, with the odd files, and learnable."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
from PIL import Image

from pipeline.sample import CLASSES, SampleConfig, generate
from tests.helpers import REPO, read_tar, tree_bytes


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = generate(SampleConfig(out=tmp_path / "a", train_per_class=3, val_per_class=2))
    generate(SampleConfig(out=tmp_path / "b", train_per_class=3, val_per_class=2))
    generate(SampleConfig(out=tmp_path / "c", train_per_class=3, val_per_class=2, seed=1))
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")
    assert tree_bytes(tmp_path / "a") != tree_bytes(tmp_path / "c")
    assert a["counts"] == {"train": 30, "val": 20, "odd": 7, "broken": 4}


def test_layout_sizes_and_odd_kinds(sample_root):
    train = sorted((sample_root / "train").glob("*/*.JPEG"))
    val = sorted((sample_root / "val").glob("*/*.JPEG"))
    assert len(train) == 300 and len(val) == 100
    assert sorted(p.name for p in (sample_root / "train").iterdir()) == sorted(w for w, _ in CLASSES)
    kinds, sizes = set(), set()
    for p in train:
        try:
            img = Image.open(p)
        except Exception:
            kinds.add("broken")
            continue
        kinds.add((img.format, img.mode))
        sizes.add(img.size)
    assert {
        ("JPEG", "RGB"),
        ("JPEG", "L"),
        ("JPEG", "CMYK"),
        ("PNG", "RGBA"),
        ("PNG", "P"),
        ("PNG", "I;16"),
        ("PNG", "RGB"),
        "broken",
    } <= kinds
    assert len(sizes) > 100 and any(w > h for w, h in sizes) and any(h > w for w, h in sizes)
    assert any(max(s) > 700 for s in sizes)
    assert any(
        Image.open(p).getexif().get(0x0112) == 6
        for p in train
        if p.name.endswith("_1.JPEG") and Image.open(p).format == "JPEG"
    )


def test_classes_are_learnable_from_the_shards(shard_set):
    """Even a nearest-centroid classifier on mean colour beats chance (10%) by far, so a CNN
    has something to learn in a few CPU minutes."""
    out, manifest = shard_set

    def features(split):
        xs, ys = [], []
        for shard in manifest["splits"][split]["shards"]:
            members = dict(read_tar(out / shard["tar"]))
            for name, data in members.items():
                if name.endswith(".jpg"):
                    px = np.asarray(Image.open(io.BytesIO(data)), dtype=np.float64)[64:192, 64:192]
                    xs.append(px.reshape(-1, 3).mean(0))
                    ys.append(int(members[name[:-3] + "cls"]))
        return np.array(xs), np.array(ys)

    xtr, ytr = features("train")
    xva, yva = features("val")
    centroids = np.stack([xtr[ytr == c].mean(0) for c in range(10)])
    pred = np.argmin(((xva[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (pred == yva).mean() > 0.4


def test_cli_refuses_to_overwrite_a_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("precious")
    r = subprocess.run(
        [sys.executable, "-m", "pipeline.sample", "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True
    )
    assert r.returncode == 2 and "not sample data" in r.stderr
    assert (tmp_path / "mine.txt").read_text() == "precious"
