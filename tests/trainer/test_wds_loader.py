"""The webdataset + DataLoader back-end on its own (no DALI needed): DaliLoader's contract,
exact epochs across Ray-style ranks, and epochs that are a pure function of (seed, epoch,
rank), so a resumed run reads exactly what an uninterrupted one would have."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from pipeline.shard import run
from pipeline.shardset import ShardSetError, open_shard_set
from pipeline.transforms import eval_crops
from tests.helpers import shard_config
from tests.trainer.helpers import truth
from trainer.loaders import DataConfig
from trainer.wds_epoch import epoch_order
from trainer.wds_loader import WdsLoader

BATCH = 16


@pytest.fixture(scope="module")
def shards(shard_set):
    out, manifest = shard_set
    return open_shard_set(out, 227), {s: truth(out, manifest, s) for s in ("train", "val")}


def cfg(**kw) -> DataConfig:
    kw.setdefault("mode", "train")
    kw.setdefault("batch_size", BATCH)
    return DataConfig(with_keys=True, **kw)


def keys_of(loader) -> list[str]:
    return [k for _, _, keys in loader for k in keys]


def test_batches_keep_the_dali_loaders_contract(shards):
    shard_set, expected = shards
    loader = WdsLoader(shard_set, "train", cfg())
    batches = list(loader)
    images, labels, keys = batches[0]
    assert images.shape == (BATCH, 3, 227, 227) and images.dtype == torch.float32 and images.is_contiguous()
    assert labels.shape == (BATCH,) and labels.dtype == torch.int64
    assert images.device.type == "cpu"
    for _, labels, keys in batches:
        assert labels.tolist() == [expected["train"][k][0] for k in keys]
    assert sorted(k for b in batches for k in b[2]) == sorted(expected["train"])
    assert len(loader) == len(batches) == loader.batches == 19 and loader.shard_size == 297
    assert [len(b[1]) for b in batches] == [BATCH] * 18 + [297 - 18 * BATCH]  # one partial batch, last
    assert loader.wait_s > 0
    plain = next(iter(WdsLoader(shard_set, "val", DataConfig(mode="center", batch_size=4))))
    assert len(plain) == 2  # (images, labels) unless keys are asked for
    for dtype in (torch.float16, torch.bfloat16):
        images, _ = next(
            iter(WdsLoader(shard_set, "val", DataConfig(mode="ten_crop", batch_size=4, dtype=str(dtype).split(".")[1])))
        )
        assert images.dtype == dtype and images.shape == (4, 10, 3, 227, 227)


@pytest.mark.parametrize("mode", ["center", "ten_crop"])
def test_evaluation_is_the_numpy_definition_serving_uses(shards, mode):
    shard_set, expected = shards
    norm = shard_set.normalization()
    loader = WdsLoader(shard_set, "val", cfg(mode=mode, num_threads=0))
    seen = []
    for images, _, keys in loader:
        for img, key in zip(images.numpy(), keys):
            ref = eval_crops(expected["val"][key][1], 227, norm, ten_crop=mode == "ten_crop")
            np.testing.assert_array_equal(img, ref if mode == "ten_crop" else ref[0])
        seen += keys
    assert len(seen) == len(set(seen)) == 99


def test_exact_epochs_across_two_ranks(shards):
    shard_set, expected = shards
    ranks = [WdsLoader(shard_set, "train", cfg(shard_id=i, num_shards=2)) for i in range(2)]
    orders = []
    for _ in range(3):
        seen = [keys_of(r) for r in ranks]
        assert not set(seen[0]) & set(seen[1])
        assert all(len(s) == len(set(s)) for s in seen)
        assert sorted(seen[0] + seen[1]) == sorted(expected["train"])
        assert [len(s) for s in seen] == [r.shard_size for r in ranks] == [148, 149]
        orders.append(seen[0])
    assert orders[0] != orders[1] != orders[2]  # reshuffled, and ranks' shares change, every epoch
    assert set(orders[0]) != set(orders[1])
    for split, mode in (("val", "center"), ("val", "ten_crop")):
        seen = [keys_of(WdsLoader(shard_set, split, cfg(mode=mode, shard_id=i, num_shards=2))) for i in range(2)]
        assert sorted(seen[0] + seen[1]) == sorted(expected[split]) and not set(seen[0]) & set(seen[1])


@pytest.mark.parametrize("counts", [[64, 64, 64, 64, 41], [297], [5, 1, 200, 91]])
def test_every_sample_once_per_epoch_for_any_number_of_ranks(counts):
    """Any world size up to samples / batch, more ranks than shards included."""
    total = sum(counts)
    for world in range(1, total // BATCH + 1):
        for epoch in range(2):
            for shuffle in (True, False):
                parts = [
                    epoch_order(counts, seed=7, epoch=epoch, rank=r, world=world, shuffle=shuffle, window=50)
                    for r in range(world)
                ]
                joined = np.concatenate(parts)
                assert len(joined) == total and np.array_equal(np.sort(joined), np.arange(total))
                assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ShardSetError, match="at least one"):
        epoch_order(counts, seed=0, epoch=0, rank=0, world=total + 1, shuffle=True, window=50)


def test_batches_read_across_many_tiny_shards(flat_shards, tmp_path):
    """Batches whose samples span many shards (here one or three samples per tar) read the
    same samples as one big shard."""
    reference = {
        k: img
        for images, _, keys in WdsLoader(flat_shards, "train", cfg(mode="center", num_threads=0))
        for img, k in zip(images, keys)
    }
    for per_shard in (1, 3):
        run(
            shard_config(
                flat_shards.root.parent / "raw", tmp_path / str(per_shard), workers=1, samples_per_shard=per_shard
            )
        )
        tiny = open_shard_set(tmp_path / str(per_shard), 227)
        assert len(tiny.files("train")[0]) == -(-64 // per_shard)
        for mode in ("center", "train"):
            got = {
                k: img
                for images, _, keys in WdsLoader(tiny, "train", cfg(mode=mode, num_threads=0))
                for img, k in zip(images, keys)
            }
            assert sorted(got) == sorted(reference)
            if mode == "center":
                assert all(torch.equal(got[k], reference[k]) for k in got)


def test_shuffle_windows_and_shard_order():
    """Train: shards in a new order each epoch, samples mixed only inside a window, so the
    reads stay local; evaluation: the manifest's order, as DALI reads it."""
    counts = [100] * 10
    a = epoch_order(counts, seed=1, epoch=0, rank=0, world=1, shuffle=True, window=100)
    b = epoch_order(counts, seed=1, epoch=1, rank=0, world=1, shuffle=True, window=100)
    shard_blocks = [set(a[i : i + 100] // 100) for i in range(0, 1000, 100)]
    assert all(len(s) == 1 for s in shard_blocks)  # window = one shard here: never mixed across
    assert [s.pop() for s in shard_blocks] != list(range(10))  # but the shards are reordered
    assert not np.array_equal(a, b)
    assert not np.array_equal(a[:100], np.sort(a[:100]))  # and shuffled within
    assert np.array_equal(
        epoch_order(counts, seed=1, epoch=3, rank=0, world=1, shuffle=False, window=100), np.arange(1000)
    )


def batches_of(loader) -> list[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    return list(loader)


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (ia, la, ka), (ib, lb, kb) in zip(a, b):
        assert ka == kb and torch.equal(la, lb) and torch.equal(ia, ib)


def test_an_epoch_is_the_same_whether_or_not_the_run_was_interrupted(shards):
    shard_set, _ = shards
    uninterrupted = WdsLoader(shard_set, "train", cfg(shard_id=1, num_shards=2, seed=3))
    epochs = [batches_of(uninterrupted) for _ in range(3)]
    resumed = WdsLoader(shard_set, "train", cfg(shard_id=1, num_shards=2, seed=3), epoch=2)
    assert_same_batches(batches_of(resumed), epochs[2])
    resumed.set_epoch(1)
    assert_same_batches(batches_of(resumed), epochs[1])
    # A different epoch, rank or seed is a different stream (keys and augmentation).
    other_rank = batches_of(WdsLoader(shard_set, "train", cfg(shard_id=0, num_shards=2, seed=3), epoch=2))
    other_seed = batches_of(WdsLoader(shard_set, "train", cfg(shard_id=1, num_shards=2, seed=4), epoch=2))
    for other in (epochs[1], other_rank, other_seed):
        assert [b[2] for b in other] != [b[2] for b in epochs[2]]


def test_batches_do_not_depend_on_the_number_of_worker_processes(shards):
    shard_set, _ = shards
    runs = [batches_of(WdsLoader(shard_set, "train", cfg(num_threads=n, seed=5), epoch=1)) for n in (0, 1, 2)]
    assert_same_batches(runs[0], runs[1])
    assert_same_batches(runs[0], runs[2])


@pytest.mark.parametrize("processes", [0, 2])
def test_reading_leaves_the_callers_random_streams_alone(shards, processes):
    """torch's global generator draws the trainer's dropout masks: a loader that took from it
    (a DataLoader iterator draws a base seed) would make a resumed run's masks differ."""
    shard_set, _ = shards
    torch.manual_seed(3)
    before = torch.get_rng_state()
    loader = WdsLoader(shard_set, "val", cfg(mode="center", num_threads=processes))
    for _ in range(2):  # a first iterator, and a persistent one reset
        next(iter(loader))
    WdsLoader(shard_set, "train", cfg(num_threads=processes), epoch=1)
    assert torch.equal(torch.get_rng_state(), before)


def test_an_index_that_does_not_fit_its_tar_is_a_clear_error(shard_set, tmp_path):
    out, _ = shard_set
    copy = tmp_path / "shards"
    shutil.copytree(out, copy)
    tars = sorted((copy / "train").glob("*.tar"))

    def fails(match: str, split: str = "train"):
        with pytest.raises(ShardSetError, match=match):
            list(WdsLoader(open_shard_set(copy, 227), split, cfg(mode="center", num_threads=0)))

    idx = tars[2].with_suffix(".idx")
    good = idx.read_text()
    lines = good.splitlines()
    key0, key1 = (line.split()[3].split(".")[0] for line in lines[1:3])
    idx.write_text(good.replace(key0 + ".", key1 + "."))  # right offsets, wrong keys: another tar's index
    fails("is the .idx stale")
    idx.write_text("\n".join([lines[0], lines[2], lines[1], *lines[3:]]) + "\n")  # two samples swapped
    fails("malformed index")
    idx.write_text(good)
    shutil.copyfile(tars[1], tars[0])  # same sample count, other samples
    fails("is the .idx stale")
