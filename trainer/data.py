"""DALI input pipeline: the shard set (contract 1) -> augmented batches for PyTorch.

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

import time
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.shardset import ShardSet, ShardSetError
from pipeline.transforms import LIGHTING_ALPHA_STD, Lighting, Normalization, center_offset, ten_crop_boxes
from trainer.model import AlexNetConfig

MODES = ("train", "center", "ten_crop")
MAX_LABEL_DIGITS = 5
KEY_BYTES = 512  # source_info ("tar:offset:key.jpg") padded to a fixed width for the iterator


@dataclass
class DataConfig:
    mode: str = "train"  # train | center | ten_crop
    batch_size: int = 128  # per worker (the paper's 128 is global: the trainer divides it)
    input_size: int = AlexNetConfig.input_size
    shard_id: int = 0
    num_shards: int = 1
    seed: int = 0  # DALI: the pipeline's seed, as given; webdataset: the run's seed (per-epoch seeds derive)
    num_threads: int = 2  # DALI threads; webdataset: DataLoader worker processes
    device: str = "auto"  # auto | gpu | cpu
    device_id: int | None = None
    dtype: str = "float32"  # float32 | float16 | bfloat16
    lighting_alpha_std: float = LIGHTING_ALPHA_STD  # 0 turns the PCA lighting off
    divide_by_std: bool = False
    normalization: Normalization | None = None  # given: used instead of the shard set's (a checkpoint's own)
    shuffle_buffer: int = 4096
    with_keys: bool = False  # also yield each sample's key (tests, debugging)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        if not 0 <= self.shard_id < self.num_shards:
            raise ValueError(f"shard_id {self.shard_id} not in [0, {self.num_shards})")


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if requested == "gpu" and not torch.cuda.is_available():
        raise RuntimeError("DALI GPU decoding requested but no CUDA device is visible")
    return requested


def _parse_label(cls):
    """`.cls` arrives as ASCII digits (uint8); turn it into an int64 class index, in-graph."""
    from nvidia.dali import fn, types
    import nvidia.dali.math as dmath

    digits = fn.cast(cls, dtype=types.INT32) - 48
    length = digits.shape()[0]
    d = fn.pad(digits, shape=[MAX_LABEL_DIGITS], fill_value=0)  # right-padded: value * 10^(5-len)
    value = d[0]
    for i in range(1, MAX_LABEL_DIGITS):
        value = value * 10 + d[i]
    return fn.cast(value // fn.cast(dmath.pow(10, MAX_LABEL_DIGITS - length), dtype=types.INT32),
                   dtype=types.INT64)


def _pipeline_fn(tars, idxs, cfg: DataConfig, image_size: int, decoder: str, norm: Normalization,
                 lighting: Lighting | None):
    from nvidia.dali import fn, types

    train = cfg.mode == "train"
    jpg, cls = fn.readers.webdataset(
        paths=tars, index_paths=idxs, ext=["jpg", "cls"], missing_component_behavior="error",
        name="reader", shard_id=cfg.shard_id, num_shards=cfg.num_shards, pad_last_batch=True,
        random_shuffle=train, initial_fill=cfg.shuffle_buffer, stick_to_shard=not train)
    images = fn.decoders.image(jpg, device=decoder, output_type=types.RGB)
    out_dtype = types.FLOAT16 if cfg.dtype == "float16" else types.FLOAT
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
            images, crop=crop, crop_pos_x=fn.random.uniform(values=offsets),
            crop_pos_y=fn.random.uniform(values=offsets), mirror=fn.random.coin_flip(probability=0.5),
            mean=mean, std=std, dtype=out_dtype, output_layout="CHW")
    else:
        # The same boxes as serving's numpy path (pipeline.transforms), as DALI crop positions.
        if cfg.mode == "ten_crop":
            boxes = ten_crop_boxes(image_size, cfg.input_size)
        else:
            c = center_offset(image_size, cfg.input_size)
            boxes = [(c, c, False)]
        patches = []
        for top, left, mirror in boxes:
            patches.append(fn.crop_mirror_normalize(
                images, crop=crop, crop_pos_x=_crop_pos(left, image_size, cfg.input_size),
                crop_pos_y=_crop_pos(top, image_size, cfg.input_size), mirror=int(mirror),
                mean=list(norm.mean), std=std, dtype=out_dtype, output_layout="CHW"))
        out = fn.stack(*patches) if len(patches) > 1 else patches[0]
    outputs = [out, _parse_label(cls)]
    if cfg.with_keys:
        outputs.append(fn.pad(fn.get_property(jpg, key="source_info"), shape=[KEY_BYTES], fill_value=0))
    return tuple(outputs)


def _crop_pos(offset: int, size: int, crop: int) -> float:
    """Pixel offset of a crop box -> DALI crop_pos (anchor = round(pos * (size - crop)))."""
    return offset / (size - crop) if size > crop else 0.0


def build_pipeline(shard_set: ShardSet, split: str, cfg: DataConfig):
    """The DALI pipeline for one worker; not yet built."""
    from nvidia.dali import pipeline_def

    if shard_set.num_classes >= 10**MAX_LABEL_DIGITS:
        raise ShardSetError(f"{shard_set.num_classes} classes: labels of more than {MAX_LABEL_DIGITS} digits")
    device = resolve_device(cfg.device)
    decoder = "mixed" if device == "gpu" else "cpu"
    device_id = (cfg.device_id if cfg.device_id is not None else torch.cuda.current_device()) if device == "gpu" else None
    tars, idxs = shard_set.files(split)
    norm = cfg.normalization or shard_set.normalization(cfg.divide_by_std)
    lighting = (Lighting.from_stats(shard_set.stats, cfg.lighting_alpha_std)
                if cfg.mode == "train" and cfg.lighting_alpha_std > 0 else None)
    pipe_def = pipeline_def(_pipeline_fn, enable_conditionals=False)
    return pipe_def(tars, idxs, cfg, shard_set.image_size, decoder, norm, lighting, batch_size=cfg.batch_size,
                    num_threads=cfg.num_threads, device_id=device_id, seed=cfg.seed,
                    prefetch_queue_depth=2), device, device_id


class DaliLoader:
    """Batches of (images, labels) on the right device, for a loop that knows nothing of DALI.

    images: float (N, 3, S, S), or (N, 10, 3, S, S) in ten_crop mode; labels: int64 (N,).
    `wait_s` accumulates the time the consumer spent waiting for data.
    """

    def __init__(self, shard_set: ShardSet, split: str, cfg: DataConfig):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        if cfg.input_size > shard_set.image_size:
            raise ShardSetError(f"model input {cfg.input_size} does not fit {shard_set.image_size}x"
                                f"{shard_set.image_size} shards")
        self.cfg = cfg
        self.split = split
        self.pipe, self.device_kind, device_id = build_pipeline(shard_set, split, cfg)
        self.pipe.build()
        self.torch_device = torch.device("cuda", device_id) if self.device_kind == "gpu" else torch.device("cpu")
        names = ["images", "labels"] + (["keys"] if cfg.with_keys else [])
        self._iter = DALIGenericIterator([self.pipe], names, reader_name="reader",
                                         last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True)
        self.wait_s = 0.0
        self.batches = 0

    def __len__(self) -> int:
        return len(self._iter)

    def __iter__(self):
        it = iter(self._iter)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)[0]
            except StopIteration:
                return
            images = batch["images"]
            if self.cfg.dtype == "bfloat16":
                images = images.to(torch.bfloat16)
            labels = batch["labels"].reshape(-1).to(torch.long)
            if self.torch_device.type == "cuda":
                labels = labels.to(self.torch_device, non_blocking=True)
            self.wait_s += time.perf_counter() - t0
            self.batches += 1
            if self.cfg.with_keys:
                yield images, labels, [_key(row) for row in batch["keys"].cpu().numpy()]
            else:
                yield images, labels


def _key(row: np.ndarray) -> str:
    info = bytes(row).rstrip(b"\0").decode("utf-8")
    return info.rsplit(":", 1)[-1].split(".", 1)[0]
