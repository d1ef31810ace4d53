"""What a Ray Train worker knows about itself once it is set up, in one object instead of five
arguments travelling together: the run's config, the shard set, its devices, its rank and
the world size, the run folder, and what follows from them (its loaders, its steps per
epoch, its precision). trainer.worker builds it; trainer.epoch and trainer.saving read it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.shardset import ShardSet
from trainer.config import TrainConfig
from trainer.loaders import DataConfig, EpochLoaders, InputLoader, open_loader
from trainer.runfolder import RunFolder

EVAL_BATCH = 64  # per worker, at most


@dataclass(frozen=True)
class WorkerContext:
    cfg: TrainConfig
    shards: ShardSet
    devices: list[torch.device]  # the worker's devices; column c on devices[c % len(devices)]
    rank: int
    world: int
    run: RunFolder

    @property
    def device(self) -> torch.device:
        """Where batches, logits and the counts live (column A's device)."""
        return self.devices[0]

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if (self.cfg.runtime.amp is True and self.gpu) else None

    @property
    def leader(self) -> bool:
        """Rank 0: the one that logs, writes the shared files and points at checkpoints."""
        return self.rank == 0

    def data_config(self, **kw: Any) -> DataConfig:
        return DataConfig(
            num_threads=self.cfg.input.loader_threads,
            device="gpu" if self.gpu else "cpu",
            device_id=self.device.index if self.gpu else None,
            divide_by_std=self.cfg.input.divide_by_std,
            input_size=self.cfg.model.input_size,
            shard_id=self.rank,
            num_shards=self.world,
            seed=self.cfg.recipe.seed,
            **kw,
        )

    def train_loaders(self) -> EpochLoaders:
        """This rank's train batches for any epoch, from the run's seed, the epoch and the rank
        only: the same whether or not the run was interrupted (trainer.loaders)."""
        return EpochLoaders(
            self.cfg.input.loader, self.shards, self.data_config(mode="train", batch_size=self.cfg.per_worker_batch)
        )

    def eval_loader(self, mode: str) -> InputLoader:
        """The val split, centre crop or the paper's 10 crops, this rank's part."""
        return open_loader(
            self.cfg.input.loader,
            self.shards,
            "val",
            self.data_config(mode=mode, batch_size=max(1, min(self.cfg.per_worker_batch, EVAL_BATCH))),
        )

    def steps_per_epoch(self) -> int:
        """Train steps every rank takes per epoch. Both back-ends give ranks floor(n/world) or that
        + 1 samples; where the + 1 would start one more batch on some ranks, that batch (of one
        sample) is left out, different each epoch. Equal steps keep every replica's weights and
        momentum identical and make collectives inside an epoch safe."""
        return math.ceil((self.shards.num_samples("train") // self.world) / self.cfg.per_worker_batch)
