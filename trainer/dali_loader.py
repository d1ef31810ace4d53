"""The DALI input back-end: the shard set (contract 1) -> augmented batches for PyTorch, through
the interface both back-ends share (trainer.loaders.InputLoader, DataConfig).

One pipeline definition (`_pipeline_fn`, made a `@pipeline_def` in `build_pipeline`) with
one cpu/mixed switch, as DALI's ResNet-50 example: JPEGs are decoded on the GPU ("mixed") when there is one, on the CPU otherwise,
and every other operator is the same code either way.

- train:    random crop of the model's input size from the 256x256 image, random mirror,
            the paper's fancy-PCA lighting (alpha ~ N(0, 0.1) per image per use), minus the
            training mean (pipeline.transforms has the numbers and the scale convention).
- center:   the centre crop.
- ten_crop: the paper's 10 patches per image, shaped (N, 10, 3, S, S) for softmax averaging.

Sharding: `shard_id`/`num_shards` = Ray worker rank/world size. Exact epochs: every sample
once per epoch across all workers; `pad_last_batch` pads a worker's last batch by repeating
its last sample and the iterator (reader_name + PARTIAL policy) drops that padding again, so
no sample is seen twice. Workers' batch counts may differ by one; the training loop's DDP
Join absorbs the difference. Train order is reshuffled every epoch (a seeded shuffle buffer, and the
shard assignment rotates between epochs).

Seeding: `DataConfig.seed` is the pipeline's seed, used as given. The trainer builds a fresh
train loader for every epoch (trainer.loaders.EpochLoaders), seeded with
`trainer.seeds.epoch_seed(run seed, epoch, rank)` and reading part `(rank + epoch) % world`,
so epoch e's order and augmentation are the same whether or not the run was interrupted
before it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, cast

import numpy as np
import torch

from pipeline.shardset import ShardSet, ShardSetError
from pipeline.transforms import Lighting, Normalization, center_offset, ten_crop_boxes
from trainer.loaders import Batch, DataConfig, InputLoader

if TYPE_CHECKING:
    from nvidia.dali.data_node import DataNode

MAX_LABEL_DIGITS = 5
KEY_BYTES = 512  # source_info ("tar:offset:key.jpg") padded to a fixed width for the iterator


def _parse_label(cls):
    """`.cls` arrives as ASCII digits (uint8); turn it into an int64 class index, in-graph."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, types

    digits = fn.cast(cls, dtype=types.DALIDataType.INT32) - 48
    length = digits.shape()[0]
    d = fn.pad(digits, shape=[MAX_LABEL_DIGITS], fill_value=0)  # right-padded: value * 10^(5-len)
    value = d[0]
    for i in range(1, MAX_LABEL_DIGITS):
        value = value * 10 + d[i]
    return fn.cast(
        value // fn.cast(dmath.pow(10, MAX_LABEL_DIGITS - length), dtype=types.DALIDataType.INT32),
        dtype=types.DALIDataType.INT64,
    )


def _pipeline_fn(
    tars, idxs, cfg: DataConfig, image_size: int, decoder: str, norm: Normalization, lighting: Lighting | None
):
    from nvidia.dali import fn, types

    train = cfg.mode == "train"
    outputs = fn.readers.webdataset(
        paths=tars,
        index_paths=idxs,
        ext=["jpg", "cls"],
        missing_component_behavior="error",
        name="reader",
        shard_id=cfg.shard_id,
        num_shards=cfg.num_shards,
        pad_last_batch=True,
        random_shuffle=train,
        initial_fill=cfg.shuffle_buffer,
        stick_to_shard=not train,
    )
    jpg, cls = cast("Sequence[DataNode]", outputs)  # two ext, two outputs (the stubs do not count them)
    images = fn.decoders.image(jpg, device=decoder, output_type=types.DALIImageType.RGB)
    out_dtype = types.DALIDataType.FLOAT16 if cfg.dtype == "float16" else types.DALIDataType.FLOAT
    crop = (cfg.input_size, cfg.input_size)
    std = list(norm.std)
    if train:
        mean = types.Constant(np.asarray(norm.mean, dtype=np.float32))
        if lighting is not None and lighting.alpha_std > 0:
            # shift = sum_k p_k * alpha_k * w_k; folded into a per-image mean: (x + shift - mean) = x - (mean - shift)
            alpha = fn.random.normal(shape=[3], stddev=lighting.alpha_std)
            w = alpha * types.Constant(lighting.shift_weights().astype(np.float32))
            p = [types.Constant(np.asarray(v, dtype=np.float32)) for v in lighting.eigenvectors]
            mean = mean - (w[0] * p[0] + w[1] * p[1] + w[2] * p[2])
        # Full decode + crop in CMN: measured faster on CPU than ROI decoding (image_crop)
        # of 227 out of 256, whose partial-scanline decode costs more than the margins.
        # Every pixel offset equally likely: a continuous uniform crop_pos would be rounded
        # to an offset, which gives the first and last offsets half the chance of the others.
        offsets = [_crop_pos(k, image_size, cfg.input_size) for k in range(image_size - cfg.input_size + 1)]
        out = fn.crop_mirror_normalize(
            images,
            crop=crop,
            crop_pos_x=fn.random.uniform(values=offsets),
            crop_pos_y=fn.random.uniform(values=offsets),
            mirror=fn.random.coin_flip(probability=0.5),
            mean=mean,
            std=std,
            dtype=out_dtype,
            output_layout="CHW",
        )
    else:
        # The same boxes as serving's numpy path (pipeline.transforms), as DALI crop positions.
        if cfg.mode == "ten_crop":
            boxes = ten_crop_boxes(image_size, cfg.input_size)
        else:
            c = center_offset(image_size, cfg.input_size)
            boxes = [(c, c, False)]
        patches = []
        for top, left, mirror in boxes:
            patches.append(
                fn.crop_mirror_normalize(
                    images,
                    crop=crop,
                    crop_pos_x=_crop_pos(left, image_size, cfg.input_size),
                    crop_pos_y=_crop_pos(top, image_size, cfg.input_size),
                    mirror=int(mirror),
                    mean=list(norm.mean),
                    std=std,
                    dtype=out_dtype,
                    output_layout="CHW",
                )
            )
        out = fn.stack(*patches) if len(patches) > 1 else patches[0]
    outputs = [out, _parse_label(cls)]
    if cfg.with_keys:
        outputs.append(fn.pad(fn.get_property(jpg, key="source_info"), shape=[KEY_BYTES], fill_value=0))
    return tuple(outputs)


def _crop_pos(offset: int, size: int, crop: int) -> float:
    """Pixel offset of a crop box -> DALI crop_pos (anchor = round(pos * (size - crop)))."""
    return offset / (size - crop) if size > crop else 0.0


def build_pipeline(
    shard_set: ShardSet,
    split: str,
    cfg: DataConfig,
    *,
    decoder: str,
    device_id: int | None,
    norm: Normalization,
    lighting: Lighting | None,
):
    """The DALI pipeline for one worker; not yet built. decoder: "mixed" (GPU) or "cpu"."""
    from nvidia.dali import pipeline_def

    if shard_set.num_classes >= 10**MAX_LABEL_DIGITS:
        raise ShardSetError(f"{shard_set.num_classes} classes: labels of more than {MAX_LABEL_DIGITS} digits")
    tars, idxs = shard_set.files(split)
    pipe_def = pipeline_def(enable_conditionals=False)(_pipeline_fn)
    return pipe_def(
        tars,
        idxs,
        cfg,
        shard_set.image_size,
        decoder,
        norm,
        lighting,
        batch_size=cfg.batch_size,
        num_threads=cfg.num_threads,
        device_id=device_id,
        seed=cfg.seed,
        prefetch_queue_depth=2,
    )


class DaliLoader(InputLoader):
    """Batches from one DALI pipeline (decoded on the GPU where the loader's device is one),
    wrapped in DALI's PyTorch iterator; the loop that consumes them knows nothing of DALI."""

    def __init__(self, shard_set: ShardSet, split: str, cfg: DataConfig):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        super().__init__(shard_set, split, cfg)
        gpu = self.device_kind == "gpu"
        self.pipe = build_pipeline(
            shard_set,
            split,
            cfg,
            decoder="mixed" if gpu else "cpu",
            device_id=self.torch_device.index if gpu else None,
            norm=self.normalization,
            lighting=self.lighting,
        )
        self.pipe.build()
        names = ["images", "labels"] + (["keys"] if cfg.with_keys else [])
        self._iter = DALIGenericIterator(
            [self.pipe], names, reader_name="reader", last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True
        )

    def __len__(self) -> int:
        return len(self._iter)

    def _batches(self) -> Iterator[Batch]:
        for out in self._iter:
            batch = out[0]
            images = batch["images"]
            if self.cfg.dtype == "bfloat16":
                images = images.to(torch.bfloat16)
            labels = batch["labels"].reshape(-1).to(torch.long)
            if self.torch_device.type == "cuda":
                labels = labels.to(self.torch_device, non_blocking=True)
            keys = [_key(row) for row in batch["keys"].cpu().numpy()] if self.cfg.with_keys else None
            yield images, labels, keys


def _key(row: np.ndarray) -> str:
    info = bytes(row).rstrip(b"\0").decode("utf-8")
    return info.rsplit(":", 1)[-1].split(".", 1)[0]
