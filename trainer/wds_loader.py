"""The input back-end where DALI cannot run: the shard set (contract 1) read through the
`webdataset` package, decoded and augmented in PyTorch DataLoader worker processes. An
`InputLoader` (trainer.loaders) like trainer.dali_loader's, yielding the same batches for the
same (shard set, split, DataConfig), plus its own `shard_size`. The numbers are
pipeline.transforms', which serving shares: train, a random S x S crop (every position
equally likely), a mirror with p = 0.5, the PCA lighting (`Lighting.shift`), minus the mean
(divided by the std if asked); center and ten_crop, `eval_crops` itself. Decoding:
`pipeline.sharded.decode_jpeg`, bit for bit DALI's CPU decoder (tests hold the evaluation
batches of the two back-ends equal).

How an epoch is cut and where its samples lie: trainer.wds_epoch.

Reading: a sample's byte range comes from the shard's .idx; each run of consecutive samples
a batch needs is read in one piece and parsed by webdataset's tar iterator. Training reads
at random inside a window of `shuffle_buffer` samples (~100 MB of ImageNet shards): keep the
shards on local disk or in page cache. On a GPU machine this back-end decodes on the CPU and
copies the batches to the GPU (pinned); DALI stays the faster path.
"""

from __future__ import annotations

import io
import math
import multiprocessing
import tarfile
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from pipeline.sharded import decode_jpeg
from pipeline.shardset import ShardSet, ShardSetError
from pipeline.transforms import Lighting, Normalization, eval_crops
from trainer.loaders import Batch, DataConfig, InputLoader
from trainer.wds_epoch import ShardIndex, batch_rng, epoch_order, key_crc

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class _Batches(IterableDataset):
    """One rank's batches; each DataLoader worker makes every K-th of them."""

    def __init__(
        self, index: ShardIndex, cfg: DataConfig, image_size: int, norm: Normalization, lighting: Lighting | None, epoch
    ):
        self.index, self.cfg, self.image_size = index, cfg, image_size
        self.norm, self.lighting = norm, lighting
        self.epoch = epoch  # a shared multiprocessing Value: set by the loader before each epoch
        self.mean = np.asarray(norm.mean, dtype=np.float32)[:, None, None]
        self.std = np.asarray(norm.std, dtype=np.float32)[:, None, None]
        self.divide = bool(np.any(self.std != 1))

    def order(self, epoch: int) -> np.ndarray:
        c = self.cfg
        return epoch_order(
            self.index.counts,
            seed=c.seed,
            epoch=epoch,
            rank=c.shard_id,
            world=c.num_shards,
            shuffle=c.mode == "train",
            window=c.shuffle_buffer,
        )

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = int(self.epoch.value)
        order, bs = self.order(epoch), self.cfg.batch_size
        for j in range(worker, math.ceil(len(order) / bs), workers):
            yield self.batch(order[j * bs : (j + 1) * bs], epoch, j)

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
        if len(samples) != b - a + 1 or not all(
            "jpg" in s and "cls" in s and key_crc(s["__key__"]) == crc
            for s, crc in zip(samples, self.index.key_crc[a : b + 1])
        ):
            raise ShardSetError(
                f"{tar}: bytes {start}-{stop} do not hold the {b - a + 1} samples (jpg + cls) "
                f"its index lists ({why}): is the .idx stale?"
            )
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
            pixels = decode_jpeg(item["jpg"])
            if pixels.shape != (self.image_size, self.image_size, 3):
                raise ShardSetError(
                    f"sample {item['__key__']} decodes to {pixels.shape}, not {self.image_size}x{self.image_size}x3"
                )
            if cfg.mode == "train":
                # The uint8 crop (mirrored) to contiguous CHW first, then one contiguous pass
                # to float: several times faster than subtracting through a transposed view.
                patch = pixels[tops[i] : tops[i] + s, lefts[i] : lefts[i] + s]
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
        return (
            torch.from_numpy(np.empty(shape, np.float32)) if dtype == torch.float32 else torch.empty(shape, dtype=dtype)
        )
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(math.prod(shape), device="cpu")
    return torch.empty(0, dtype=dtype).new(storage).view(shape)


class WdsLoader(InputLoader):
    """Batches of (images, labels) from webdataset + a torch DataLoader: the InputLoader
    contract (shapes, dtypes, layout, exact epochs across ranks, `len`, `wait_s`, keys).

    Each iteration is one epoch: the first is `epoch` (0 unless resuming), the next one
    follows; `set_epoch` jumps. `cfg.num_threads` DataLoader worker processes (0: in this
    process) decode and augment; they persist across epochs.
    """

    def __init__(self, shard_set: ShardSet, split: str, cfg: DataConfig, *, epoch: int = 0):
        super().__init__(shard_set, split, cfg)
        if cfg.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {tuple(_DTYPES)}")
        self.epoch = epoch
        index = ShardIndex.read(shard_set, split)
        self._epoch = multiprocessing.Value("q", epoch, lock=False)
        self._dataset = _Batches(index, cfg, shard_set.image_size, self.normalization, self.lighting, self._epoch)
        self._num_samples = len(self._dataset.order(epoch))
        workers = max(0, cfg.num_threads)
        # Its own generator: each DataLoader iterator draws a base seed from it, and from torch's
        # global one (the caller's: the trainer's dropout masks) otherwise, which would make a
        # resumed run's masks differ. Nothing here uses that seed: batch_rng makes the draws.
        self._loader = DataLoader(
            self._dataset,
            batch_size=None,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=self.device_kind == "gpu",
            prefetch_factor=2 if workers > 0 else None,
            generator=torch.Generator(),
        )

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration yields (0-based)."""
        self.epoch = epoch

    @property
    def shard_size(self) -> int:
        """Samples this rank sees per epoch (exact; the same every epoch)."""
        return self._num_samples

    def __len__(self) -> int:
        return math.ceil(self._num_samples / self.cfg.batch_size)

    def _batches(self) -> Iterator[Batch]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        self._epoch.value = epoch
        return self._on_device(iter(self._loader))

    def _on_device(self, it: Iterator[Batch]) -> Iterator[Batch]:
        cuda = self.torch_device.type == "cuda"
        for images, labels, keys in it:
            if cuda:
                images = images.to(self.torch_device, non_blocking=True)
                labels = labels.to(self.torch_device, non_blocking=True)
            yield images, labels, keys
