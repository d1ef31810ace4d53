"""The two input back-ends give the same data: DALI (trainer.dali_loader) and webdataset +
DataLoader (trainer.wds_loader), on real shards written by pipeline.shard.

Evaluation: pixel for pixel. Training: in distribution, each back-end against the paper's
augmentation (every crop position equally likely, mirror rate 1/2, lighting shift with the
covariance the PCA implies) and labels identical per key. The DALI cases skip where DALI
is not installed; the webdataset ones run everywhere.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.shardset import open_shard_set
from pipeline.transforms import Lighting
from tests.trainer.helpers import locate, truth
from trainer.loaders import DataConfig
from trainer.wds_loader import WdsLoader

BATCH = 16
BACKENDS = ["dali", "webdataset"]


def make_loader(backend: str, shard_set, split: str, cfg: DataConfig):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
        from trainer.dali_loader import DaliLoader

        return DaliLoader(shard_set, split, cfg)
    return WdsLoader(shard_set, split, cfg)


@pytest.fixture(scope="module")
def shards(shard_set):
    out, manifest = shard_set
    return open_shard_set(out, 227), {s: truth(out, manifest, s) for s in ("train", "val")}


@pytest.mark.parametrize("mode", ["center", "ten_crop"])
def test_evaluation_batches_are_identical_pixel_for_pixel(shards, mode):
    pytest.importorskip("nvidia.dali")
    shard_set, _ = shards
    got = {}
    for backend in BACKENDS:
        loader = make_loader(backend, shard_set, "val", DataConfig(mode=mode, batch_size=BATCH, with_keys=True))
        got[backend] = {
            k: (img, int(label)) for images, labels, keys in loader for img, label, k in zip(images, labels, keys)
        }
    dali, wds = got["dali"], got["webdataset"]
    assert sorted(dali) == sorted(wds) and len(dali) == shard_set.num_samples("val")
    assert next(iter(wds.values()))[0].shape == ((10, 3, 227, 227) if mode == "ten_crop" else (3, 227, 227))
    for key in dali:
        assert dali[key][1] == wds[key][1]
        assert torch.equal(dali[key][0], wds[key][0]), f"{key}: the back-ends' {mode} pixels differ"


def chi_square(counts: np.ndarray) -> float:
    expected = counts.sum() / len(counts)
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_crops_are_uniform_mirrors_half_and_labels_exact(shards, backend):
    """Four epochs of train crops (lighting off), each located in its source image."""
    shard_set, expected = shards
    cfg = DataConfig(mode="train", batch_size=BATCH, lighting_alpha_std=0.0, with_keys=True)
    loader = make_loader(backend, shard_set, "train", cfg)
    norm = shard_set.normalization()
    span = shard_set.image_size - 227 + 1
    positions, mirrors, epochs = [], [], 4
    for _ in range(epochs):
        seen = []
        for images, labels, keys in loader:
            assert labels.tolist() == [expected["train"][k][0] for k in keys]
            for img, key in zip(images.numpy(), keys):
                found = locate(img, expected["train"][key][1], norm)
                assert found is not None, f"train patch of {key} is not a crop of its image"
                positions += found[:2]
                mirrors.append(found[2])
            seen += keys
        assert sorted(seen) == sorted(expected["train"])  # an exact epoch
    n = len(mirrors)
    assert n == epochs * 297
    counts = np.bincount(positions, minlength=span)
    assert len(counts) == span == 30
    # Ends of the range as likely as the middle: a rounded uniform (DALI's crop_pos) halves them.
    edges, p_edge = counts[0] + counts[-1], 2 / span
    sd = np.sqrt(len(positions) * p_edge * (1 - p_edge))
    assert abs(edges - len(positions) * p_edge) < 4 * sd, (
        f"edge positions {edges}, expected {len(positions) * p_edge:.0f}"
    )
    assert chi_square(counts) < 58.3  # 29 degrees of freedom, p = 0.001
    assert abs(sum(mirrors) - n / 2) < 4 * np.sqrt(n / 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pca_lighting_has_the_covariance_the_eigendecomposition_implies(flat_shards, backend):
    centre = {}
    for images, _, keys in make_loader(
        backend, flat_shards, "train", DataConfig(mode="center", batch_size=BATCH, with_keys=True)
    ):
        centre.update({k: img.mean(dim=(1, 2)).numpy() for img, k in zip(images, keys)})
    train = make_loader(backend, flat_shards, "train", DataConfig(mode="train", batch_size=BATCH, with_keys=True))
    shifts = []
    for _ in range(12):
        for images, _, keys in train:
            per_pixel = images.numpy().reshape(len(keys), 3, -1)
            assert per_pixel.std(axis=2).max() < 1e-3  # one shift for the whole image
            shifts += [img.mean(axis=1) - centre[k] for img, k in zip(per_pixel, keys)]
    shifts = np.array(shifts, dtype=np.float64)
    lighting = Lighting.from_stats(flat_shards.stats)
    assert len(shifts) == 12 * 64
    p = np.asarray(lighting.eigenvectors)
    # In the eigenbasis the shift's components are independent with std 0.1 * w_k.
    proj = shifts @ p.T
    expected_std = 0.1 * lighting.shift_weights()
    np.testing.assert_allclose(proj.std(axis=0), expected_std, rtol=0.12)
    assert np.abs(proj.mean(axis=0)).max() < 0.2 * expected_std.max()
    corr = np.corrcoef(proj.T)
    assert np.abs(corr[np.triu_indices(3, 1)]).max() < 0.15
    np.testing.assert_allclose(
        np.cov(shifts.T), lighting.shift_covariance(), atol=0.25 * lighting.shift_covariance().max()
    )
