"""What each Ray Train worker runs: `train_loop_per_worker(config)`, the training loop.

Data parallel across workers (DDP; each rank reads its own part of the train split, through
DALI or the webdataset back-end, trainer.loaders), and inside each worker the paper's model
parallelism: column A on the worker's first device, column B on its second (one GPU: both
on it; none: both on the CPU). A DDP module spanning two devices is built with
device_ids=None.

Setup (`setup`), once: the worker's devices and its `WorkerContext` (trainer.context); the
model, with identical initial weights on every rank; per-rank seeding, or resuming from the
newest checkpoint (trainer.resume: weights into this model, optimizer, schedule, guard, RNG
streams, allowed config changes); DDP; torch.compile (--compile). Then the loop: per epoch
`run_epoch` (trainer.epoch), a metrics line (and rank 0's TensorBoard scalars, trainer.board),
and the checkpoint (trainer.saving: room for it is checked before the epoch), until the run's
epochs are done or the divergence guard stops it; then the TensorBoard images of the finished
run.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import socket
import sys
from dataclasses import replace
from pathlib import Path
from typing import cast

import torch

from pipeline.cli import setup_logging
from pipeline.shardset import open_shard_set
from trainer.board import Board
from trainer.checkpoint import unwrap
from trainer.config import TrainConfig
from trainer.context import WorkerContext
from trainer.epoch import Models, log_epoch, run_epoch
from trainer.loaders import resolve_loader
from trainer.model import AlexNet
from trainer.resume import State, new_state, resume, resume_source
from trainer.runfolder import RunFolder
from trainer.saving import check_room, report_divergence, save_checkpoint, stop_out_of_space
from trainer.seeds import seed_rank

log = logging.getLogger("trainer.worker")
# Ray Train logs two INFO lines per rank per report ("Reporting training result N:
# TrainingReport(...)", "Checkpoint successfully created at ..."), from these modules' loggers
# (one is named after its file, so it is looked up through the module).
RAY_REPORT_MODULES = ("ray.train.v2._internal.execution.context", "ray.train.v2._internal.execution.storage")


def worker_devices(gpus_per_worker: int) -> list[torch.device]:
    if gpus_per_worker <= 0:
        return [torch.device("cpu")]
    import ray.train.torch

    devices = ray.train.torch.get_devices()
    if not devices or devices[0].type != "cuda":
        raise RuntimeError(f"asked for {gpus_per_worker} GPU(s) per worker but the worker sees {devices}")
    return devices


def build_model(ctx: WorkerContext) -> AlexNet:
    """Identical initial weights on every rank (seeded with the run's seed)."""
    cfg = ctx.cfg
    column_devices = tuple(ctx.devices[i % len(ctx.devices)] for i in range(cfg.model.columns))
    torch.manual_seed(cfg.recipe.seed)
    model = AlexNet(cfg.model, devices=column_devices)
    if cfg.runtime.channels_last is True:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch documents and accepts memory_format; its overloads omit it
    return model


def compiled(model: torch.nn.Module) -> torch.nn.Module:
    # torch.compile wraps a Module in an OptimizedModule, itself a Module; its stubs say only Callable
    return cast(torch.nn.Module, torch.compile(model))


def wrap_ddp(model: torch.nn.Module, world: int) -> torch.nn.Module:
    if world <= 1:
        return model
    import ray.train.torch

    return ray.train.torch.prepare_model(
        model, move_to_device=False, parallel_strategy_kwargs={"device_ids": None, "output_device": None}
    )


def quiet_ray_reports(ray_reports: bool) -> None:
    """Ray's per-report lines off the console (warnings stay), unless --ray-reports."""
    if ray_reports:
        return
    for name in RAY_REPORT_MODULES:
        logger = getattr(sys.modules.get(name) or _import(name), "logger", None)
        if isinstance(logger, logging.Logger):
            logger.setLevel(logging.WARNING)


def _import(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:  # another Ray version: its lines stay
        return None


def record_worker(ctx: WorkerContext) -> None:
    """Where each worker lives (ops, and the fault-tolerance test uses the pid)."""
    ctx.run.write_text(
        f".workers/rank{ctx.rank}.json",
        json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "devices": [str(d) for d in ctx.devices]}),
    )


def setup(config: dict) -> tuple[WorkerContext, State, Models]:
    """The worker's context, and its state: new, or resumed from the run's newest checkpoint."""
    import ray.train

    cfg = TrainConfig.from_json(config)
    quiet_ray_reports(cfg.runtime.ray_reports)
    train_ctx = ray.train.get_context()
    devices = worker_devices(cfg.runtime.layout[1])
    if devices[0].type == "cpu":
        torch.set_num_threads(max(1, cfg.runtime.cpus_per_worker))
    cfg = replace(cfg, input=replace(cfg.input, loader=resolve_loader(cfg.input.loader)))  # the driver's choice
    ctx = WorkerContext(
        cfg=cfg,
        shards=open_shard_set(cfg.input.data, cfg.model.input_size),
        devices=devices,
        rank=train_ctx.get_world_rank(),
        world=train_ctx.get_world_size(),
        run=RunFolder(cfg.runtime.storage_path, cfg.runtime.name),
    )
    record_worker(ctx)

    state = new_state(cfg.recipe, build_model(ctx))
    seed_rank(cfg.recipe.seed, ctx.rank)
    source, where = resume_source(cfg, ctx.run)
    if source is not None:
        with source as folder:
            meta = resume(state, Path(folder), cfg, ctx.rank, devices)
        if ctx.leader:
            log.info(
                "resuming from %s after epoch %d (val top-1 error %.3f)",
                where,
                state.epoch,
                meta.metrics.get("val_top1_error", float("nan")),
            )
    if ctx.leader:
        ctx.run.truncate_metrics(state.epoch)  # epochs a dead run wrote past its checkpoint are redone
    state.model = wrap_ddp(state.model, ctx.world)
    net = unwrap(state.model)
    models = (
        Models(train=compiled(state.model), eval=compiled(net))
        if cfg.runtime.compile
        else Models(train=state.model, eval=net)
    )
    return ctx, state, models


def train_loop_per_worker(config: dict) -> None:
    setup_logging()
    ctx, state, models = setup(config)
    train_data = ctx.train_loaders()
    val = ctx.eval_loader("center")
    # TensorBoard, beside metrics.jsonl (rank 0)
    board = (
        Board.open(ctx.run.uri, resumed_epoch=state.epoch, steps_per_epoch=ctx.steps_per_epoch())
        if ctx.leader
        else None
    )
    eval_seconds = 0.0
    try:
        while state.epoch < ctx.cfg.recipe.epochs:
            full = check_room(state, ctx)
            if full is not None:
                stop_out_of_space(ctx, full)
                return
            result = run_epoch(state, ctx, models, train_data, val, eval_seconds, board)
            if result.diverged:
                report_divergence(state, ctx, *result.diverged)
                return
            eval_seconds = result.metrics["eval_seconds"]
            if ctx.leader:
                log_epoch(ctx.cfg.recipe, result.metrics)
                ctx.run.append_metrics(result.metrics)
                if board is not None:
                    board.epoch(result.metrics)
            save_checkpoint(state, ctx, result.metrics)
        if board is not None:
            board.finish(unwrap(state.model), ctx.run.metrics())
    finally:
        if board is not None:
            board.close()
