"""The DALI input pipeline on CPU, reading real shards written by pipeline.shard."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from pipeline.shard import run
from pipeline.shardset import ShardSetError, open_shard_set
from pipeline.transforms import eval_crops
from tests.helpers import shard_config
from tests.trainer.helpers import locate, truth
from trainer.dali_loader import DaliLoader
from trainer.loaders import DataConfig

BATCH = 16


@pytest.fixture(scope="module")
def shards(shard_set):
    out, manifest = shard_set
    return open_shard_set(out, 227), {s: truth(out, manifest, s) for s in ("train", "val")}


def epoch(loader: DaliLoader) -> list[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    return list(loader)


def test_shapes_dtypes_and_labels_match_the_shards(shards):
    shard_set, expected = shards
    loader = DaliLoader(shard_set, "train", DataConfig(mode="train", batch_size=BATCH, with_keys=True))
    batches = epoch(loader)
    images, labels, keys = batches[0]
    assert images.shape == (BATCH, 3, 227, 227) and images.dtype == torch.float32
    assert labels.shape == (BATCH,) and labels.dtype == torch.int64
    assert images.device.type == "cpu"
    for _, labels, keys in batches:
        assert labels.tolist() == [expected["train"][k][0] for k in keys]
    assert sum(len(b[2]) for b in batches) == shard_set.num_samples("train") == 297
    assert len(loader) == len(batches) == 19
    assert loader.wait_s > 0 and loader.batches == 19


def test_exact_epochs_across_two_workers(shards):
    shard_set, expected = shards
    loaders = [
        DaliLoader(
            shard_set, "train", DataConfig(mode="train", batch_size=BATCH, shard_id=i, num_shards=2, with_keys=True)
        )
        for i in range(2)
    ]
    for _ in range(2):  # two epochs: shard assignment rotates, coverage stays exact
        seen = [[k for _, _, keys in epoch(ld) for k in keys] for ld in loaders]
        assert not set(seen[0]) & set(seen[1])
        assert len(seen[0]) == len(set(seen[0])) and len(seen[1]) == len(set(seen[1]))
        assert sorted(seen[0] + seen[1]) == sorted(expected["train"])
        assert sorted(len(s) for s in seen) == [148, 149]


def test_random_crop_and_mirror_differ_across_epochs(shards):
    shard_set, expected = shards
    cfg = DataConfig(mode="train", batch_size=BATCH, lighting_alpha_std=0.0, with_keys=True)
    loader = DaliLoader(shard_set, "train", cfg)
    norm = shard_set.normalization()
    where: dict[str, list] = {}
    for _ in range(2):
        images, _, keys = next(iter(loader))
        for img, key in zip(images.numpy(), keys):
            found = locate(img, expected["train"][key][1], norm)
            assert found is not None, f"train patch of {key} is not a crop of its image"
            where.setdefault(key, []).append(found)
        for _ in loader:  # finish the epoch
            pass
    positions = [p for ps in where.values() for p in ps]
    assert len({(top, left) for top, left, _ in positions}) > len(positions) // 2  # crops spread out
    mirrored = sum(m for _, _, m in positions)
    assert 0.2 * len(positions) < mirrored < 0.8 * len(positions)
    twice = [ps for ps in where.values() if len(ps) == 2]
    assert twice and all(a != b for a, b in twice)  # the same image, augmented anew each epoch


@pytest.mark.parametrize("mode", ["center", "ten_crop"])
def test_eval_crops_equal_the_numpy_definition_serving_uses(shards, mode):
    shard_set, expected = shards
    loader = DaliLoader(shard_set, "val", DataConfig(mode=mode, batch_size=BATCH, with_keys=True))
    norm = shard_set.normalization()
    images, labels, keys = next(iter(loader))
    want_shape = (BATCH, 10, 3, 227, 227) if mode == "ten_crop" else (BATCH, 3, 227, 227)
    assert images.shape == want_shape
    for img, key in zip(images.numpy(), keys):
        ref = eval_crops(expected["val"][key][1], 227, norm, ten_crop=(mode == "ten_crop"))
        np.testing.assert_allclose(img, ref if mode == "ten_crop" else ref[0], atol=1e-4)


def test_ten_crop_geometry_is_the_papers():
    from pipeline.transforms import ten_crop_boxes

    boxes = ten_crop_boxes(256, 227)
    assert boxes[0::2] == [(0, 0, False), (0, 29, False), (29, 0, False), (29, 29, False), (15, 15, False)]
    assert [m for _, _, m in boxes] == [False, True] * 5


def test_bfloat16_and_float16_outputs(shards):
    shard_set, _ = shards
    for dtype, torch_dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        images, _ = next(iter(DaliLoader(shard_set, "val", DataConfig(mode="center", batch_size=4, dtype=dtype))))
        assert images.dtype == torch_dtype


def test_clear_errors_for_unusable_shard_sets(shard_set, tmp_path):
    out, _ = shard_set
    with pytest.raises(ShardSetError, match="does not exist"):
        open_shard_set(tmp_path / "nothing")
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "train").mkdir()
    with pytest.raises(ShardSetError, match="incomplete: no manifest.json"):
        open_shard_set(incomplete)
    with pytest.raises(ShardSetError, match="does not fit"):
        open_shard_set(out, input_size=299)
    broken = tmp_path / "broken"
    broken.mkdir()
    manifest = json.loads((out / "manifest.json").read_text())
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardSetError, match="is missing"):
        open_shard_set(broken)


@pytest.mark.gpu
@pytest.mark.parametrize("mode, split", [("center", "val"), ("train", "train")])
def test_the_mixed_pipeline_on_the_gpu_gives_the_cpu_pipelines_batches(shards, mode, split):
    """DALI's `mixed` decoder (nvJPEG) and its CPU one, on the same shards with the same seed:
    the same samples in the same order, the same crops, mirrors and PCA-lighting draws (DALI's
    random operators run on the CPU either way, seeded alike) and the same normalisation,
    within the two JPEG decoders' rounding (a crop one pixel off is far outside it)."""
    shard_set, _ = shards

    def batches(device: str) -> list[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        cfg = DataConfig(
            mode=mode, batch_size=BATCH, seed=7, device=device, device_id=0 if device == "gpu" else None, with_keys=True
        )
        out = []
        for images, labels, keys in DaliLoader(shard_set, split, cfg):
            assert images.is_cuda == labels.is_cuda == (device == "gpu")
            out.append((images.cpu(), labels.cpu(), keys))
        return out

    gpu, cpu = batches("gpu"), batches("cpu")
    assert len(gpu) == len(cpu) > 1
    for (g, g_labels, g_keys), (c, c_labels, c_keys) in zip(gpu, cpu):
        assert g_keys == c_keys and torch.equal(g_labels, c_labels) and g.shape == c.shape
        diff = (g - c).abs()  # pixel units: the paper's input is centred, not scaled
        assert diff.mean() < 1.5 and torch.quantile(diff.flatten(), 0.99) < 12, (float(diff.mean()), float(diff.max()))


def test_label_parsing_handles_multi_digit_indices(tmp_path):
    """Class indices with 1..4 digits (ImageNet's 0..999) parse exactly inside the pipeline."""
    root = tmp_path / "raw" / "train"
    wnids = [f"n{i:08d}" for i in range(1200)]
    picked = [0, 7, 42, 999, 1000, 1199]
    for i in range(1200):
        (root / wnids[i]).mkdir(parents=True)
    for i in picked:
        Image.new("RGB", (256, 256), (i % 256, 0, 0)).save(root / wnids[i] / f"img{i}.png")
    run(shard_config(tmp_path / "raw", tmp_path / "shards", workers=1))
    ss = open_shard_set(tmp_path / "shards", 227)
    got = Counter()
    for _, labels, keys in DaliLoader(ss, "train", DataConfig(mode="center", batch_size=4, with_keys=True)):
        for label, key in zip(labels.tolist(), keys):
            assert key == f"img{label}"
            got[label] += 1
    assert sorted(got) == picked
