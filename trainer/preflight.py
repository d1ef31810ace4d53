"""What trainer.run's driver checks and decides before Ray starts a single worker: the shard
set (complete, both splits), the layout ("auto" resolved from the run's stored settings on a
resubmission, else from the cluster's nodes: trainer.layout), what that layout must satisfy
(the batch splits over the workers, each worker gets samples, GPUs per worker 0-2, --resume
names a resumable checkpoint), the input back-end every worker will use, and the class count.
Every refusal is a TrainSetupError with a message saying what is wrong.
"""

from __future__ import annotations

import os
from dataclasses import replace

from pipeline.shardset import ShardSet, ShardSetError, open_shard_set
from trainer.checkpoint import TRAIN_STATE, resolve
from trainer.checkpoint_meta import CheckpointError
from trainer.config import RuntimeConfig, TrainConfig
from trainer.layout import LayoutError, Node, cluster_nodes, connect, local_nodes, resolve_layout
from trainer.loaders import LoaderUnavailable, resolve_loader
from trainer.resume import stored_config
from trainer.runfolder import RunFolder


class TrainSetupError(RuntimeError):
    pass


def open_shards(cfg: TrainConfig) -> ShardSet:
    """The shard set, complete and with both splits (before Ray is asked anything)."""
    try:
        shards = open_shard_set(cfg.input.data, cfg.model.input_size)
    except ShardSetError as exc:
        raise TrainSetupError(str(exc)) from None
    for split in ("train", "val"):
        if split not in shards.manifest["splits"]:
            raise TrainSetupError(f"shard set {cfg.input.data} has no {split} split")
    return shards


def check_setup(cfg: TrainConfig, shards: ShardSet) -> None:
    """What can be known wrong before Ray starts a single worker: about the layout as far as it
    is known (a value still "auto" is checked once resolved; fit calls this before and after)."""
    runtime = cfg.runtime
    workers, gpus = runtime.workers, runtime.gpus_per_worker
    if isinstance(workers, int) and (workers < 1 or cfg.recipe.batch_size % workers):
        raise TrainSetupError(f"the global batch {cfg.recipe.batch_size} must split evenly over {workers} worker(s)")
    # DALI splits samples (not files) between workers: any count works while each gets some.
    samples = shards.num_samples("train")
    if isinstance(workers, int) and samples < workers:
        raise TrainSetupError(f"--workers {workers} is more than the {samples} train samples of {cfg.input.data}")
    if isinstance(gpus, int) and gpus not in (0, 1, 2):
        raise TrainSetupError("--gpus-per-worker is 0 (CPU), 1 (both columns on one GPU) or 2 (one column each)")
    if runtime.resume_from:
        try:
            folder = resolve(runtime.resume_from).checkpoint
        except CheckpointError as exc:
            raise TrainSetupError(f"--resume: {exc}") from None
        if not (folder / TRAIN_STATE).is_file():
            raise TrainSetupError(f"--resume {folder}: no {TRAIN_STATE}, so it cannot resume training")


def stored_runtime(cfg: TrainConfig, fresh: bool = False) -> RuntimeConfig | None:
    """The runtime settings the run (or --resume's checkpoint) was trained with, if any."""
    stored, _ = stored_config(RunFolder(cfg.runtime.storage_path, cfg.runtime.name), cfg, fresh=fresh)
    return TrainConfig.from_json(stored).runtime if stored else None


def with_layout(cfg: TrainConfig, nodes: list[Node] | None, stored: RuntimeConfig | None) -> TrainConfig:
    """`cfg` with its "auto" layout and precision resolved: from the run's stored settings on a
    resubmission, else from the cluster's nodes (trainer.layout)."""
    try:
        runtime = resolve_layout(
            cfg.runtime, nodes or [], columns=cfg.model.columns, batch_size=cfg.recipe.batch_size, stored=stored
        )
    except LayoutError as exc:
        raise TrainSetupError(str(exc)) from None
    return replace(cfg, runtime=runtime)


def prepare(cfg: TrainConfig, shards: ShardSet) -> TrainConfig:
    """The config a run is stored with and every worker reads: checked, the input back-end
    decided (every worker reads alike), the class count the shard set's."""
    check_setup(cfg, shards)
    try:
        loader = resolve_loader(cfg.input.loader)
    except LoaderUnavailable as exc:
        raise TrainSetupError(str(exc)) from None
    return replace(
        cfg, input=replace(cfg.input, loader=loader), model=replace(cfg.model, num_classes=shards.num_classes)
    )


def config_to_print(cfg: TrainConfig, address: str | None) -> TrainConfig:
    """--print-config: the layout resolved as a submission would resolve it, from the run's
    stored settings, else the Ray cluster (--address or RAY_ADDRESS), else this machine."""
    stored = stored_runtime(cfg)
    nodes = None
    if stored is None:
        if address or os.environ.get("RAY_ADDRESS"):
            import ray

            connected = connect(address)
            try:
                nodes = cluster_nodes()
            finally:
                if connected:
                    ray.shutdown()
        else:
            nodes = local_nodes()
    cfg = with_layout(cfg, nodes, stored)
    try:
        return replace(cfg, input=replace(cfg.input, loader=resolve_loader(cfg.input.loader)))
    except LoaderUnavailable as exc:
        raise TrainSetupError(str(exc)) from None
