"""Which input back-end reads the shard set, and the one place that builds either.

- `dali` (trainer.data.DaliLoader): the default wherever `import nvidia.dali` works, and the
  only back-end that decodes on the GPU.
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
from dataclasses import replace

from pipeline.shardset import ShardSet
from trainer.data import DataConfig
from trainer.seeds import epoch_seed

log = logging.getLogger("trainer.loaders")
LOADERS = ("dali", "webdataset")
AUTO = "auto"
CHOICES = (AUTO, *LOADERS)
_fell_back = False  # the fallback is logged once per process


class LoaderUnavailable(RuntimeError):
    """The back-end asked for cannot run here."""


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
        raise LoaderUnavailable(f"the DALI loader was asked for, but nvidia.dali cannot be imported here ({why}); "
                                "use --loader webdataset (or auto)")
    if not _fell_back:
        _fell_back = True
        log.warning("DALI is not available here (%s): reading the shards with the webdataset back-end "
                    "(trainer.wds_loader: the same augmentation, decoded on the CPU). --loader picks one "
                    "explicitly.", why)
    return "webdataset"


def open_loader(kind: str, shard_set: ShardSet, split: str, cfg: DataConfig, *, epoch: int = 0):
    """A loader of `kind` over `split`, for evaluation or for a train epoch. `cfg.seed` is the
    DALI pipeline's own seed (used as given) and, for webdataset, the run's seed from which
    each epoch's seed is derived; `epoch` is the webdataset loader's first epoch."""
    if kind == "dali":
        from trainer.data import DaliLoader

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
      seeds (trainer.wds_loader.epoch_order and batch_rng)."""

    def __init__(self, kind: str, shard_set: ShardSet, cfg: DataConfig):
        if kind not in LOADERS:
            raise ValueError(f"unknown loader {kind!r}; choose from {', '.join(LOADERS)}")
        self.kind, self.shard_set, self.cfg = kind, shard_set, replace(cfg, mode="train")
        self._wds = None

    def for_epoch(self, epoch: int):
        cfg = self.cfg
        if self.kind == "dali":
            return open_loader("dali", self.shard_set, "train", replace(
                cfg, seed=epoch_seed(cfg.seed, epoch, cfg.shard_id), shard_id=(cfg.shard_id + epoch) % cfg.num_shards))
        if self._wds is None:
            self._wds = open_loader("webdataset", self.shard_set, "train", cfg, epoch=epoch)
        else:
            self._wds.set_epoch(epoch)
        return self._wds
