"""The webdataset back-end's epoch plan, which trainer.wds_loader reads by, and where each
sample lies in its tar (`ShardIndex`, from the .idx files DALI reads too).

An epoch, for Ray worker `rank` of `world` (cfg.shard_id, cfg.num_shards), is a pure
function of (shard sizes, seed, epoch, rank, world, batch size, shuffle window), see
`epoch_order`; its seeds come from `trainer.seeds.epoch_seed`, which the DALI path's
per-epoch seeds come from too (`cfg.seed` is the run's seed):
1. train: the shards are put in a random order drawn from `epoch_seed(seed, epoch, None)`,
   the same on every rank; evaluation keeps the manifest's order.
2. that sequence of samples is cut into `world` contiguous ranges, rank r taking
   [total*r // world, total*(r+1) // world): samples, not files, as DALI divides them, so
   every sample is seen exactly once per epoch across all ranks, for any world size up to
   the number of samples, however few shards there are. Ranges differ by at most one.
3. train: the rank's range is shuffled inside consecutive windows of `shuffle_buffer`
   samples (index-level permutations drawn from `epoch_seed(seed, epoch, rank)`), like
   DALI's shuffle buffer of the same size.
4. batches are consecutive slices of that order. Batch j is made by DataLoader worker
   j % K and its random draws (crop, mirror, lighting) come from a generator keyed by
   (epoch_seed(seed, epoch, rank), j); the DataLoader returns batches in order. So the
   batches, their contents and their augmentation do not depend on the number of worker
   processes or their timing, and epoch e is the same whether or not the run was
   interrupted before it: resuming needs only the epoch number.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from pipeline.shardset import ShardSet, ShardSetError
from trainer.seeds import epoch_seed

TAR_BLOCK = 512
_PERMUTE, _AUGMENT = 0, 1  # spawn keys: the rank's window shuffle; batch j's augmentation


def epoch_order(
    counts: list[int] | np.ndarray, *, seed: int, epoch: int, rank: int, world: int, shuffle: bool, window: int
) -> np.ndarray:
    """The samples rank `rank` of `world` sees in `epoch`, in order, as indices into the
    shard set's samples in manifest order (shard by shard). See the module docstring."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} not in [0, {world})")
    if world > total:
        raise ShardSetError(f"{world} workers but only {total} samples: every worker needs at least one")
    starts = np.concatenate([[0], np.cumsum(counts)])
    if shuffle:
        shard_order = np.random.default_rng(epoch_seed(seed, epoch, None)).permutation(len(counts))
        sequence = np.concatenate([np.arange(starts[s], starts[s + 1]) for s in shard_order])
    else:
        sequence = np.arange(total)
    mine = sequence[total * rank // world : total * (rank + 1) // world].copy()
    if shuffle:
        rng = np.random.default_rng(np.random.SeedSequence(epoch_seed(seed, epoch, rank), spawn_key=(_PERMUTE,)))
        window = max(1, window)
        for lo in range(0, len(mine), window):
            mine[lo : lo + window] = rng.permutation(mine[lo : lo + window])
    return mine


def batch_rng(seed: int, epoch: int, rank: int, batch: int) -> np.random.Generator:
    """The generator of batch `batch`'s augmentation draws (epoch_seed keyed by the batch)."""
    return np.random.default_rng(np.random.SeedSequence(epoch_seed(seed, epoch, rank), spawn_key=(_AUGMENT, batch)))


@dataclass(frozen=True)
class ShardIndex:
    """Where each sample lies in its tar: samples in manifest order, numbered 0..total-1."""

    tars: tuple[str, ...]
    first: np.ndarray  # index of each shard's first sample
    begin: np.ndarray  # per sample: byte offset where its tar members begin
    end: np.ndarray  # per sample: byte offset just past its last member (block aligned)
    key_crc: np.ndarray  # per sample: CRC-32 of its key, to catch an index that is not its tar's

    @classmethod
    def read(cls, shard_set: ShardSet, split: str) -> ShardIndex:
        tars, idxs = shard_set.files(split)
        begin, end, crcs, counts = [], [], [], []
        for _tar, idx in zip(tars, idxs):
            ends, key_crc = _read_idx(idx)
            counts.append(len(ends))
            end.append(ends)
            crcs.append(key_crc)
            begin.append(np.concatenate([[0], ends[:-1]]))  # members are contiguous: a sample
            # begins where the previous one ended (so any extension headers are included)
        expected = shard_set.num_samples(split)
        if sum(counts) != expected:
            raise ShardSetError(
                f"{shard_set.root}: the {split} indexes list {sum(counts)} samples, the manifest {expected}"
            )
        return cls(
            tars=tuple(tars),
            first=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            begin=np.concatenate(begin).astype(np.int64),
            end=np.concatenate(end).astype(np.int64),
            key_crc=np.concatenate(crcs).astype(np.uint32),
        )

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.first)

    def shard_of(self, samples: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.first, samples, side="right") - 1


def key_crc(key: str) -> int:
    return zlib.crc32(key.encode("utf-8"))


def _read_idx(idx_path: str) -> tuple[np.ndarray, np.ndarray]:
    """From a DALI wds2idx index (`v1.2 N`, then per sample `ext offset size name` groups,
    offsets of member data): where each sample's last member ends, rounded up to a block,
    and the CRC-32 of each sample's key."""
    with open(idx_path) as f:
        header = f.readline().split()
        ends, crcs = [], []
        for line in f:
            fields = line.split()
            if not fields:
                continue
            offsets, sizes = fields[1::4], fields[2::4]
            ends.append(max(-(-(int(o) + int(s)) // TAR_BLOCK) * TAR_BLOCK for o, s in zip(offsets, sizes)))
            crcs.append(key_crc(fields[3].split(".", 1)[0]))  # keys end at the first dot, as webdataset's
    ends_array = np.asarray(ends, dtype=np.int64)
    if len(header) < 2 or int(header[1]) != len(ends) or np.any(np.diff(ends_array) <= 0):
        raise ShardSetError(
            f"{idx_path}: malformed index (header {' '.join(header)!r}, {len(ends)} samples, offsets must increase)"
        )
    return ends_array, np.asarray(crcs, dtype=np.uint32)
