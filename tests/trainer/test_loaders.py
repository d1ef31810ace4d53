"""trainer/loaders.py: the one interface both input back-ends implement, which back-end is
used where, and the trainer's per-epoch train batches, for both back-ends (the DALI half is
skipped where DALI is not installed)."""

from __future__ import annotations

import logging
import sys
from dataclasses import replace

import pytest
import torch

from pipeline.shardset import ShardSetError, open_shard_set
from trainer import loaders
from trainer.loaders import DataConfig, EpochLoaders, InputLoader, LoaderUnavailable, open_loader, resolve_loader


@pytest.fixture
def without_dali(monkeypatch):
    """This process as on a platform without DALI: `import nvidia.dali` raises ImportError."""
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    monkeypatch.setattr(loaders, "_fell_back", False)


def test_dali_is_the_default_where_it_imports():
    pytest.importorskip("nvidia.dali")
    assert resolve_loader() == resolve_loader("auto") == resolve_loader("dali") == "dali"
    assert resolve_loader("webdataset") == "webdataset"
    with pytest.raises(ValueError, match="unknown loader"):
        resolve_loader("ffcv")


def test_without_dali_auto_falls_back_to_webdataset_saying_so_once(without_dali, caplog):
    with caplog.at_level(logging.WARNING, logger="trainer.loaders"):
        assert [resolve_loader("auto") for _ in range(3)] == ["webdataset"] * 3
    assert len(caplog.records) == 1 and "DALI is not available" in caplog.text and "webdataset" in caplog.text
    assert resolve_loader("webdataset") == "webdataset"
    with pytest.raises(LoaderUnavailable, match="--loader webdataset"):
        resolve_loader("dali")


BACKENDS = [
    pytest.param(
        "dali", marks=pytest.mark.skipif(loaders.dali_import_error() is not None, reason="DALI is not installed")
    ),
    "webdataset",
]


@pytest.mark.parametrize("kind", BACKENDS)
def test_an_epochs_train_batches_depend_on_run_seed_epoch_and_rank_only(shard_set, kind):
    """The trainer's train batches: rebuilt for epoch e of rank r (as after a restart), they
    have the same crops, mirrors, lighting and order; the same data in another epoch, or read
    by another rank, is augmented and ordered anew. A webdataset loader moved on to epoch e
    gives what one built at e gives."""
    shards = open_shard_set(shard_set[0], 227)
    cfg = DataConfig(mode="train", batch_size=16, num_threads=1, seed=5)

    def first_batch(epoch: int, rank: int, world: int, data: EpochLoaders | None = None) -> torch.Tensor:
        data = data or EpochLoaders(kind, shards, replace(cfg, shard_id=rank, num_shards=world))
        return next(iter(data.for_epoch(epoch)))[0]

    a = first_batch(1, 0, 1)
    assert torch.equal(a, first_batch(1, 0, 1))
    running = EpochLoaders(kind, shards, cfg)
    first_batch(0, 0, 1, running)
    assert torch.equal(a, first_batch(1, 0, 1, running))  # epoch 0 then 1 = a restart at 1
    assert torch.equal(a, first_batch(1, 0, 1, running))  # asked for epoch 1 again: epoch 1 again
    assert not torch.equal(a, first_batch(2, 0, 1))  # same images (one worker), next epoch
    assert not torch.equal(first_batch(1, 0, 2), first_batch(1, 1, 2))
    assert not torch.equal(a, first_batch(1, 0, 1, EpochLoaders(kind, shards, replace(cfg, seed=6))))  # run seed


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("mode", ["train", "center", "ten_crop"])
def test_both_back_ends_through_the_one_interface(shard_set, kind, mode):
    """open_loader gives an InputLoader whatever the back-end: len() batches of (images, labels)
    (with keys when asked), on its device, the images normalised as the shard set says, the
    time waited for them counted; a crop that does not fit the images is refused alike."""
    shards = open_shard_set(shard_set[0], 67)
    cfg = DataConfig(mode=mode, batch_size=32, input_size=67, num_threads=1, with_keys=True)
    loader = open_loader(kind, shards, "val", cfg)
    assert isinstance(loader, InputLoader) and loader.torch_device == torch.device("cpu")
    assert loader.normalization == shards.normalization(False) and (loader.lighting is None) == (mode != "train")
    batches = list(loader)
    assert len(batches) == len(loader) == loader.batches == -(-shards.num_samples("val") // 32)
    images, labels, keys = batches[0]
    assert images.shape == ((32, 10, 3, 67, 67) if mode == "ten_crop" else (32, 3, 67, 67))
    assert images.dtype == torch.float32 and labels.dtype == torch.int64 and len(keys) == 32
    assert sum(len(b[1]) for b in batches) == shards.num_samples("val") and loader.wait_s > 0
    assert len(set().union(*(b[2] for b in batches))) == shards.num_samples("val")  # each sample once
    with pytest.raises(ShardSetError, match="does not fit"):
        open_loader(kind, open_shard_set(shard_set[0]), "val", DataConfig(input_size=257))
