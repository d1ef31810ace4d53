"""The input back-end where DALI cannot run: the shard set (contract 1) read through the
`webdataset` package, decoded and augmented in PyTorch DataLoader worker processes.

It yields what trainer.data's `DaliLoader` yields, for the same (shard set, split,
DataConfig): (images, labels[, keys]) batches, images float (N, 3, S, S) or (N, 10, 3, S, S)
in ten_crop mode, CHW, in `cfg.dtype`; labels int64 (N,); `len()`, `wait_s`, `batches`
(and its own `shard_size`). The numbers come from pipeline.transforms, the definition serving shares:
- train:    a random S x S crop, every position equally likely; a mirror with p = 0.5;
            the paper's PCA lighting (`Lighting.shift`, alpha ~ N(0, lighting_alpha_std));
            minus the training mean (divided by the std if asked).
- center, ten_crop: `pipeline.transforms.eval_crops` itself, the function serving calls.
- decoding: simplejpeg (libjpeg-turbo) with the accurate integer DCT and fancy chroma
            upsampling, libjpeg's defaults and what DALI's CPU decoder uses: the same pixels,
            bit for bit (tests hold the two back-ends' evaluation batches equal).

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

Reading: a sample's byte range in its tar comes from the shard's .idx (the index DALI
reads); each run of consecutive samples a batch needs is read with one seek and read,
then parsed by webdataset's tar iterator and key grouping. Evaluation reads sequentially;
training reads at random inside a window of `shuffle_buffer` consecutive samples of the
rank's range (about 100 MB of ImageNet shards), so keep the shards on local disk or in
page cache. DALI stays the faster path and the only one that decodes on the GPU; on a GPU
machine this back-end decodes on the CPU and copies the batches to the GPU (pinned).
"""

from __future__ import annotations

import io
import math
import multiprocessing
import tarfile
import time
import zlib
from dataclasses import dataclass

import numpy as np
import simplejpeg
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from pipeline.transforms import Lighting, Normalization, eval_crops
from pipeline.shardset import ShardSet, ShardSetError
from trainer.data import DataConfig, resolve_device
from trainer.seeds import epoch_seed

TAR_BLOCK = 512
_PERMUTE, _AUGMENT = 0, 1  # spawn keys: the rank's window shuffle; batch j's augmentation
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def epoch_order(counts: list[int] | np.ndarray, *, seed: int, epoch: int, rank: int, world: int,
                shuffle: bool, window: int) -> np.ndarray:
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
    mine = sequence[total * rank // world: total * (rank + 1) // world].copy()
    if shuffle:
        rng = np.random.default_rng(np.random.SeedSequence(epoch_seed(seed, epoch, rank), spawn_key=(_PERMUTE,)))
        window = max(1, window)
        for lo in range(0, len(mine), window):
            mine[lo:lo + window] = rng.permutation(mine[lo:lo + window])
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
    def read(cls, shard_set: ShardSet, split: str) -> "ShardIndex":
        tars, idxs = shard_set.files(split)
        begin, end, crcs, counts = [], [], [], []
        for tar, idx in zip(tars, idxs):
            ends, key_crc = _read_idx(idx)
            counts.append(len(ends))
            end.append(ends)
            crcs.append(key_crc)
            begin.append(np.concatenate([[0], ends[:-1]]))  # members are contiguous: a sample
            # begins where the previous one ended (so any extension headers are included)
        expected = shard_set.num_samples(split)
        if sum(counts) != expected:
            raise ShardSetError(f"{shard_set.root}: the {split} indexes list {sum(counts)} samples, "
                                f"the manifest {expected}")
        return cls(tars=tuple(tars), first=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                   begin=np.concatenate(begin).astype(np.int64), end=np.concatenate(end).astype(np.int64),
                   key_crc=np.concatenate(crcs).astype(np.uint32))

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
        raise ShardSetError(f"{idx_path}: malformed index (header {' '.join(header)!r}, {len(ends)} samples, "
                            "offsets must increase)")
    return ends_array, np.asarray(crcs, dtype=np.uint32)


def decode(jpg: bytes) -> np.ndarray:
    """JPEG -> RGB uint8 HWC, exactly as DALI's CPU decoder (and pipeline.transforms.as_sharded)."""
    return simplejpeg.decode_jpeg(jpg, colorspace="RGB", fastdct=False, fastupsample=False)


class _Batches(IterableDataset):
    """One rank's batches; each DataLoader worker makes every K-th of them."""

    def __init__(self, index: ShardIndex, cfg: DataConfig, image_size: int, norm: Normalization,
                 lighting: Lighting | None, epoch):
        self.index, self.cfg, self.image_size = index, cfg, image_size
        self.norm, self.lighting = norm, lighting
        self.epoch = epoch  # a shared multiprocessing Value: set by the loader before each epoch
        self.mean = np.asarray(norm.mean, dtype=np.float32)[:, None, None]
        self.std = np.asarray(norm.std, dtype=np.float32)[:, None, None]
        self.divide = bool(np.any(self.std != 1))

    def order(self, epoch: int) -> np.ndarray:
        c = self.cfg
        return epoch_order(self.index.counts, seed=c.seed, epoch=epoch, rank=c.shard_id, world=c.num_shards,
                           shuffle=c.mode == "train", window=c.shuffle_buffer)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = int(self.epoch.value)
        order, bs = self.order(epoch), self.cfg.batch_size
        for j in range(worker, math.ceil(len(order) / bs), workers):
            yield self.batch(order[j * bs:(j + 1) * bs], epoch, j)

    def read(self, samples: np.ndarray) -> list[dict]:
        """The samples (webdataset dicts: __key__, jpg, cls), in the order asked for. Runs of
        consecutive samples in one shard are read in one piece."""
        got: dict[int, dict] = {}
        ordered = np.sort(samples)
        shards = self.index.shard_of(ordered)
        breaks = np.flatnonzero((np.diff(ordered) != 1) | (np.diff(shards) != 0)) + 1
        for run, shard in zip(np.split(ordered, breaks), np.split(shards, breaks)):
            a, b = int(run[0]), int(run[-1])
            got.update(zip(range(a, b + 1), self._read_run(int(shard[0]), a, b)))
        return [got[int(s)] for s in samples]

    def _read_run(self, shard: int, a: int, b: int) -> list[dict]:
        tar = self.index.tars[shard]
        start, stop = int(self.index.begin[a]), int(self.index.end[b])
        with open(tar, "rb") as f:
            f.seek(start)
            data = f.read(stop - start)
        try:
            samples = list(group_by_keys(tar_file_expander([{"url": tar, "stream": io.BytesIO(data)}])))
        except (tarfile.TarError, ValueError) as e:
            samples, why = [], f"{type(e).__name__}: {e}"
        else:
            why = f"{len(samples)} samples there"
        if len(samples) != b - a + 1 or not all("jpg" in s and "cls" in s and key_crc(s["__key__"]) == crc
                                                for s, crc in zip(samples, self.index.key_crc[a:b + 1])):
            raise ShardSetError(f"{tar}: bytes {start}-{stop} do not hold the {b - a + 1} samples (jpg + cls) "
                                f"its index lists ({why}): is the .idx stale?")
        return samples

    def batch(self, samples: np.ndarray, epoch: int, j: int):
        cfg, s = self.cfg, self.cfg.input_size
        items = self.read(samples)
        n = len(items)
        shape = (n, 10, 3, s, s) if cfg.mode == "ten_crop" else (n, 3, s, s)
        images = _empty(shape, torch.float32) if cfg.dtype == "float32" else torch.empty(shape)
        out = images.numpy()
        if cfg.mode == "train":
            rng = batch_rng(cfg.seed, epoch, cfg.shard_id, j)
            span = self.image_size - s + 1
            tops, lefts = rng.integers(0, span, n), rng.integers(0, span, n)
            mirrors = rng.random(n) < 0.5
            means = np.broadcast_to(self.mean, (n, 3, 1, 1)).astype(np.float32)
            if self.lighting is not None:
                shifts = self.lighting.shift(rng.normal(0.0, self.lighting.alpha_std, (n, 3)))
                means = (means - shifts[:, :, None, None]).astype(np.float32)  # x + shift - mean
        for i, item in enumerate(items):
            pixels = decode(item["jpg"])
            if pixels.shape != (self.image_size, self.image_size, 3):
                raise ShardSetError(f"sample {item['__key__']} decodes to {pixels.shape}, not "
                                    f"{self.image_size}x{self.image_size}x3")
            if cfg.mode == "train":
                # The uint8 crop (mirrored) to contiguous CHW first, then one contiguous pass
                # to float: several times faster than subtracting through a transposed view.
                patch = pixels[tops[i]:tops[i] + s, lefts[i]:lefts[i] + s]
                patch = np.ascontiguousarray((patch[:, ::-1] if mirrors[i] else patch).transpose(2, 0, 1))
                np.subtract(patch, means[i], out=out[i])
                if self.divide:
                    out[i] /= self.std
            else:
                crops = eval_crops(pixels, s, self.norm, ten_crop=cfg.mode == "ten_crop")
                out[i] = crops if cfg.mode == "ten_crop" else crops[0]
        if cfg.dtype != "float32":
            images = _empty(shape, _DTYPES[cfg.dtype]).copy_(images)
        labels = torch.tensor([int(item["cls"]) for item in items], dtype=torch.int64)
        return images, labels, [item["__key__"] for item in items]


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor to fill; inside a DataLoader worker, allocated in shared memory (as torch's
    default_collate does), so handing it to the main process copies nothing. In process,
    numpy's allocation (huge pages where the kernel offers them: measured 3x fewer
    first-touch costs than torch.empty for a 40 MB batch)."""
    if get_worker_info() is None:
        return torch.from_numpy(np.empty(shape, np.float32)) if dtype == torch.float32 else torch.empty(shape, dtype=dtype)
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(math.prod(shape), device="cpu")
    return torch.empty(0, dtype=dtype).new(storage).view(shape)


class WdsLoader:
    """Batches of (images, labels) from webdataset + a torch DataLoader: DaliLoader's
    contract (shapes, dtypes, layout, exact epochs across ranks, `len`, `wait_s`, keys).

    Each iteration is one epoch: the first is `epoch` (0 unless resuming), the next one
    follows; `set_epoch` jumps. `cfg.num_threads` DataLoader worker processes (0: in this
    process) decode and augment; they persist across epochs.
    """

    def __init__(self, shard_set: ShardSet, split: str, cfg: DataConfig, *, epoch: int = 0):
        if cfg.input_size > shard_set.image_size:
            raise ShardSetError(f"model input {cfg.input_size} does not fit {shard_set.image_size}x"
                                f"{shard_set.image_size} shards")
        if cfg.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {tuple(_DTYPES)}")
        self.cfg, self.split, self.epoch = cfg, split, epoch
        self.device_kind = resolve_device(cfg.device)
        self.torch_device = (torch.device("cuda", cfg.device_id if cfg.device_id is not None
                                          else torch.cuda.current_device())
                             if self.device_kind == "gpu" else torch.device("cpu"))
        index = ShardIndex.read(shard_set, split)
        lighting = (Lighting.from_stats(shard_set.stats, cfg.lighting_alpha_std)
                    if cfg.mode == "train" and cfg.lighting_alpha_std > 0 else None)
        self._epoch = multiprocessing.Value("q", epoch, lock=False)
        norm = cfg.normalization or shard_set.normalization(cfg.divide_by_std)  # given: a checkpoint's own
        self._dataset = _Batches(index, cfg, shard_set.image_size, norm, lighting, self._epoch)
        self._num_samples = len(self._dataset.order(epoch))
        workers = max(0, cfg.num_threads)
        # Its own generator: each DataLoader iterator draws a base seed from it, and from torch's
        # global one (the caller's: the trainer's dropout masks) otherwise, which would make a
        # resumed run's masks differ. Nothing here uses that seed: batch_rng makes the draws.
        self._loader = DataLoader(self._dataset, batch_size=None, num_workers=workers,
                                  persistent_workers=workers > 0, pin_memory=self.device_kind == "gpu",
                                  prefetch_factor=2 if workers > 0 else None, generator=torch.Generator())
        self.wait_s = 0.0
        self.batches = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration yields (0-based)."""
        self.epoch = epoch

    @property
    def shard_size(self) -> int:
        """Samples this rank sees per epoch (exact; the same every epoch)."""
        return self._num_samples

    def __len__(self) -> int:
        return math.ceil(self._num_samples / self.cfg.batch_size)

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        self._epoch.value = epoch
        return self._batches(iter(self._loader))

    def _batches(self, it):
        cuda = self.torch_device.type == "cuda"
        while True:
            t0 = time.perf_counter()
            try:
                images, labels, keys = next(it)
            except StopIteration:
                return
            if cuda:
                images = images.to(self.torch_device, non_blocking=True)
                labels = labels.to(self.torch_device, non_blocking=True)
            self.wait_s += time.perf_counter() - t0
            self.batches += 1
            yield (images, labels, keys) if self.cfg.with_keys else (images, labels)
