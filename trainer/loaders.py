"""The input back-ends' one interface, which back-end reads the shard set, and the one place
that builds either.

- `DataConfig`: what a loader is asked for (mode, batch, crop size, rank's part, seed,
  threads, device, dtype, lighting, normalisation), the same for both back-ends.
- `InputLoader`: what both back-ends are. The shared preamble (the crop fits the images,
  the device, the normalisation, the PCA lighting) and the timed iteration: it yields
  (images, labels[, keys]) on the loader's device, images float (N, 3, S, S), or
  (N, 10, 3, S, S) in ten_crop mode, labels int64 (N,); `len()` batches; `wait_s`, the time
  the consumer spent waiting for data; `batches`, how many it got. A back-end supplies
  `__len__` and `_batches()`.
- `dali` (trainer.dali_loader.DaliLoader): the default wherever `import nvidia.dali` works,
  and the only back-end that decodes on the GPU.
- `webdataset` (trainer.wds_loader.WdsLoader): the webdataset package and a PyTorch
  DataLoader, with the same augmentation and evaluation crops; decodes on the CPU. Chosen
  automatically, with one warning, where DALI cannot be imported (no wheel for the platform).

`resolve_loader("auto")` decides in the process that starts the work (trainer.run's driver,
trainer.evaluate); the concrete name then travels in the run's config, so every Ray worker of
a run reads with the same back-end (the two cut an epoch between ranks differently).

Train data is seeded per epoch and rank from the run's seed, by `trainer.seeds.epoch_seed` for
both back-ends, so epoch e's order and augmentation are the same whether or not the run was
interrupted before it (`EpochLoaders`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from pipeline.shardset import ShardSet, ShardSetError
from pipeline.transforms import LIGHTING_ALPHA_STD, Normalization
from trainer.model import AlexNetConfig
from trainer.seeds import epoch_seed

if TYPE_CHECKING:
    from trainer.wds_loader import WdsLoader

log = logging.getLogger("trainer.loaders")
LOADERS = ("dali", "webdataset")
AUTO = "auto"
CHOICES = (AUTO, *LOADERS)
_fell_back = False  # the fallback is logged once per process


MODES = ("train", "center", "ten_crop")
Batch = tuple[torch.Tensor, torch.Tensor, list[str] | None]  # images, labels, keys (with_keys)


class LoaderUnavailable(RuntimeError):
    """The back-end asked for cannot run here."""


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
    """auto | gpu | cpu -> gpu | cpu (gpu where CUDA is visible); gpu without CUDA is an error."""
    if requested == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if requested == "gpu" and not torch.cuda.is_available():
        raise RuntimeError("GPU input requested but no CUDA device is visible")
    return requested


class InputLoader:
    """The interface and the shared part of both input back-ends (see the module docstring)."""

    def __init__(self, shard_set: ShardSet, split: str, cfg: DataConfig):
        if cfg.input_size > shard_set.image_size:
            raise ShardSetError(
                f"model input {cfg.input_size} does not fit {shard_set.image_size}x{shard_set.image_size} shards"
            )
        self.cfg, self.split = cfg, split
        self.device_kind = resolve_device(cfg.device)
        self.torch_device = (
            torch.device("cuda", cfg.device_id if cfg.device_id is not None else torch.cuda.current_device())
            if self.device_kind == "gpu"
            else torch.device("cpu")
        )
        self.normalization = cfg.normalization or shard_set.normalization(cfg.divide_by_std)
        self.lighting = (
            shard_set.lighting(cfg.lighting_alpha_std) if cfg.mode == "train" and cfg.lighting_alpha_std > 0 else None
        )
        self.wait_s = 0.0
        self.batches = 0

    def __len__(self) -> int:
        raise NotImplementedError

    def _batches(self) -> Iterator[Batch]:
        """This pass's batches, on `torch_device`: (images, labels, keys or None)."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[tuple]:
        return self._timed(self._batches())

    def _timed(self, it: Iterator[Batch]) -> Iterator[tuple]:
        while True:
            t0 = time.perf_counter()
            try:
                images, labels, keys = next(it)
            except StopIteration:
                return
            self.wait_s += time.perf_counter() - t0
            self.batches += 1
            yield (images, labels, keys) if self.cfg.with_keys else (images, labels)


def dali_import_error() -> str | None:
    """Why `import nvidia.dali` fails here, or None when it works."""
    try:
        import nvidia.dali  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install (a missing shared library)
        return f"{type(exc).__name__}: {exc}"
    return None


def resolve_loader(requested: str = AUTO) -> str:
    """`auto` -> `dali` where DALI imports, else `webdataset` (logged once); an explicit name
    is kept, and `dali` where DALI does not import is a LoaderUnavailable."""
    global _fell_back
    if requested not in CHOICES:
        raise ValueError(f"unknown loader {requested!r}; choose from {', '.join(CHOICES)}")
    if requested == "webdataset":
        return requested
    why = dali_import_error()
    if why is None:
        return "dali"
    if requested == "dali":
        raise LoaderUnavailable(
            f"the DALI loader was asked for, but nvidia.dali cannot be imported here ({why}); "
            "use --loader webdataset (or auto)"
        )
    if not _fell_back:
        _fell_back = True
        log.warning(
            "DALI is not available here (%s): reading the shards with the webdataset back-end "
            "(trainer.wds_loader: the same augmentation, decoded on the CPU). --loader picks one "
            "explicitly.",
            why,
        )
    return "webdataset"


def open_loader(kind: str, shard_set: ShardSet, split: str, cfg: DataConfig, *, epoch: int = 0) -> InputLoader:
    """A loader of `kind` over `split`, for evaluation or for a train epoch. `cfg.seed` is the
    DALI pipeline's own seed (used as given) and, for webdataset, the run's seed from which
    each epoch's seed is derived; `epoch` is the webdataset loader's first epoch."""
    if kind == "dali":
        from trainer.dali_loader import DaliLoader

        return DaliLoader(shard_set, split, cfg)
    if kind == "webdataset":
        from trainer.wds_loader import WdsLoader

        return WdsLoader(shard_set, split, cfg, epoch=epoch)
    raise ValueError(f"unknown loader {kind!r}; choose from {', '.join(LOADERS)}")


class EpochLoaders:
    """Epoch e's train batches for one rank (`cfg.shard_id` of `cfg.num_shards`), seeded from the
    run's seed (`cfg.seed`), epoch and rank only:
    - dali: a pipeline built for the epoch, seeded `epoch_seed(seed, e, rank)` and reading
      part (rank + e) mod world (DALI's shuffle buffer alone would keep each rank on its part);
    - webdataset: one WdsLoader, first built at the starting epoch (`epoch=e`) and moved to
      each next epoch; its worker processes persist, and it derives the same per-epoch, per-rank
      seeds (trainer.wds_epoch.epoch_order and batch_rng)."""

    def __init__(self, kind: str, shard_set: ShardSet, cfg: DataConfig):
        if kind not in LOADERS:
            raise ValueError(f"unknown loader {kind!r}; choose from {', '.join(LOADERS)}")
        self.kind, self.shard_set, self.cfg = kind, shard_set, replace(cfg, mode="train")
        self._wds: WdsLoader | None = None

    def for_epoch(self, epoch: int) -> InputLoader:
        cfg = self.cfg
        if self.kind == "dali":
            return open_loader(
                "dali",
                self.shard_set,
                "train",
                replace(
                    cfg,
                    seed=epoch_seed(cfg.seed, epoch, cfg.shard_id),
                    shard_id=(cfg.shard_id + epoch) % cfg.num_shards,
                ),
            )
        if self._wds is None:
            from trainer.wds_loader import WdsLoader

            self._wds = WdsLoader(self.shard_set, "train", cfg, epoch=epoch)
        else:
            self._wds.set_epoch(epoch)
        return self._wds
