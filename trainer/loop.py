"""What each Ray Train worker runs: `train_loop_per_worker(config)`.

Data parallel across workers (DDP; each rank reads its own part of the train split, through
DALI or the webdataset back-end, trainer.loaders), and
inside each worker the paper's model parallelism: column A on the worker's first device,
column B on its second (one GPU: both on it; none: both on the CPU). A DDP module spanning
two devices must be built with device_ids=None.

The steps, one function each: devices; the model (identical initial weights on every rank);
seeding (per rank) or resuming (weights, optimizer, schedule, guard, and this rank's RNG
states from the checkpoint, then any allowed config change); DDP; loaders (epoch e's train
batches seeded by (run seed, e, rank) only: trainer.loaders.EpochLoaders); the epochs; the
checkpoint payload.

Every epoch every worker calls ray.train.report (a barrier) with its part of the checkpoint:
rank 0 the model and the shared state, every rank its own RNG states; Ray merges them into one
folder. Once all have returned, rank 0 points latest_checkpoint.json at it. On start, a worker
resumes from ray.train.get_checkpoint() (the latest one Ray registered), else from
`resume_from` (--resume PATH).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import socket
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from trainer import checkpoint as ckpt_io
from trainer.config import TrainConfig, config_changes
from pipeline.shardset import ShardSet, open_shard_set
from trainer.data import DataConfig
from trainer.engine import StepHooks, evaluate, train_one_epoch
from trainer.guard import DivergenceGuard
from trainer.loaders import EpochLoaders, open_loader, resolve_loader
from trainer.model import AlexNet, AlexNetConfig
from trainer.optim import apply_changes, build_optimizer, build_scheduler, plateau_judges, set_lr, warmup_scale
from trainer.progress import Progress
from trainer.runfolder import DIVERGED, RunFolder
from trainer.seeds import capture_rng, epoch_seed, restore_rng, seed_rank

log = logging.getLogger("trainer.loop")
EVAL_BATCH = 64  # per worker, at most
# Ray Train logs two INFO lines per rank per report ("Reporting training result N:
# TrainingReport(...)", "Checkpoint successfully created at ..."), from these modules' loggers
# (one is named after its file, so it is looked up through the module).
RAY_REPORT_MODULES = ("ray.train.v2._internal.execution.context", "ray.train.v2._internal.execution.storage")


@dataclass
class State:
    """What a worker trains and what a checkpoint restores."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    epoch: int = 0  # epochs done
    lr_drops: int = 0
    guard: DivergenceGuard = field(default_factory=DivergenceGuard)
    last_checkpoint: str | None = None  # for the divergence message


# ---- devices and model ------------------------------------------------------------------

def worker_devices(cfg: TrainConfig) -> list[torch.device]:
    if cfg.gpus_per_worker <= 0:
        return [torch.device("cpu")]
    import ray.train.torch

    devices = ray.train.torch.get_devices()
    if not devices or devices[0].type != "cuda":
        raise RuntimeError(f"asked for {cfg.gpus_per_worker} GPU(s) per worker but the worker sees {devices}")
    return devices


def build_model(cfg: TrainConfig, num_classes: int, devices: list[torch.device]) -> AlexNet:
    """Identical initial weights on every rank (seeded with the run's seed)."""
    model_cfg = AlexNetConfig(num_classes=num_classes, input_size=cfg.input_size, columns=cfg.columns, lrn=cfg.lrn,
                              pool_kernel=cfg.pool_kernel, init=cfg.init)
    column_devices = tuple(devices[i % len(devices)] for i in range(cfg.columns))
    torch.manual_seed(cfg.seed)
    model = AlexNet(model_cfg, devices=column_devices)
    return model.to(memory_format=torch.channels_last) if cfg.channels_last else model


def new_state(cfg: TrainConfig, model: AlexNet) -> State:
    optimizer = build_optimizer(model, cfg)
    return State(model=model, optimizer=optimizer, scheduler=build_scheduler(optimizer, cfg))


# ---- resume ------------------------------------------------------------------------------

def train_state_payload(state: State, cfg: TrainConfig, world: int) -> dict:
    """The shared resume state (rank 0 writes it): loads with torch.load(weights_only=True)."""
    return {"epoch": state.epoch, "optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(),
            "lr_drops": state.lr_drops, "guard": state.guard.state_dict(), "config": cfg.to_json(),
            "world_size": world}


def rank_state_payload(state: State, rank: int, devices: list[torch.device]) -> dict:
    return {"rank": rank, "epoch": state.epoch, "rng": capture_rng(devices)}


def resume(state: State, folder: Path, cfg: TrainConfig, rank: int, devices: list[torch.device]) -> None:
    """Put a checkpoint back: weights, optimizer, schedule, guard, this rank's RNG streams; then
    apply what the (driver-approved) config changes."""
    restored, meta = ckpt_io.load_model(folder, devices=state.model.devices)
    state.model.load_state_dict(restored.state_dict())
    shared = ckpt_io.load_train_state(folder)
    state.optimizer.load_state_dict(shared["optimizer"])
    state.scheduler.load_state_dict(shared["scheduler"])
    state.epoch, state.lr_drops = int(shared["epoch"]), int(shared["lr_drops"])
    state.guard.load_state_dict(shared["guard"])
    old = TrainConfig.from_json(shared["config"])
    changes = config_changes(shared["config"], cfg)
    if changes:
        apply_changes(state.optimizer, state.scheduler, old, cfg)
        if rank == 0:
            log.info("applying changed settings from epoch %d: %s", state.epoch + 1,
                     ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()))
    own = ckpt_io.load_rank_state(folder, rank)
    try:
        if own is None:
            raise ValueError(f"it has no state for rank {rank}")
        restore_rng(own["rng"], devices)
    except ValueError as exc:  # a changed worker count or device layout (--allow-changes)
        log.warning("rank %d: fresh random streams, not the checkpoint's (%s)", rank, exc)
        seed_rank(epoch_seed(cfg.seed, state.epoch, rank, "rng"), rank)  # deterministic all the same
    state.last_checkpoint = str(folder)


def resume_source(cfg: TrainConfig, run: RunFolder):
    """The checkpoint to resume from: the run's newest, else --resume PATH.

    The run's newest is the later of Ray's registered checkpoint and the one
    latest_checkpoint.json names: a worker killed right after a checkpoint can restart before
    Ray's controller has registered it, and the pointer is written only once every rank's
    part is persisted."""
    import ray.train

    candidates = []
    registered = ray.train.get_checkpoint()
    if registered is not None:
        candidates.append((ckpt_io.epoch_of(registered.path) or 0, registered))
    pointer = ckpt_io.parse_pointer(run.read_text(ckpt_io.POINTER))
    if pointer is not None:
        path = run.path(pointer["checkpoint"])
        candidates.append((pointer["epoch"], ray.train.Checkpoint(path=path, filesystem=run.fs)))
    if candidates:
        _, newest = max(candidates, key=lambda c: c[0])
        return newest.as_directory(), newest.path
    if cfg.resume_from:
        path = ckpt_io.resolve(cfg.resume_from)

        @contextmanager
        def local():
            yield str(path)

        return local(), str(path)
    return None, None


# ---- DDP and loaders ----------------------------------------------------------------------

def wrap_ddp(model: torch.nn.Module, world: int) -> torch.nn.Module:
    if world <= 1:
        return model
    import ray.train.torch

    return ray.train.torch.prepare_model(model, move_to_device=False,
                                         parallel_strategy_kwargs={"device_ids": None, "output_device": None})


def data_config(cfg: TrainConfig, devices: list[torch.device], **kw) -> DataConfig:
    gpu = devices[0].type == "cuda"
    return DataConfig(num_threads=cfg.loader_threads, device="gpu" if gpu else "cpu",
                      device_id=devices[0].index if gpu else None, divide_by_std=cfg.divide_by_std, **kw)


def train_loaders(shards: ShardSet, cfg: TrainConfig, devices, rank: int, world: int) -> EpochLoaders:
    """This rank's train batches for any epoch, from the run's seed, the epoch and the rank
    only: the same whether or not the run was interrupted (trainer.loaders)."""
    return EpochLoaders(cfg.loader, shards, data_config(
        cfg, devices, mode="train", batch_size=cfg.per_worker_batch, input_size=cfg.input_size, shard_id=rank,
        num_shards=world, seed=cfg.seed))


def eval_loader(shards: ShardSet, cfg: TrainConfig, devices, mode: str, rank: int, world: int):
    return open_loader(cfg.loader, shards, "val", data_config(
        cfg, devices, mode=mode, batch_size=max(1, min(cfg.per_worker_batch, EVAL_BATCH)), input_size=cfg.input_size,
        shard_id=rank, num_shards=world, seed=cfg.seed))


def steps_per_epoch(shards: ShardSet, cfg: TrainConfig, world: int) -> int:
    """Train steps every rank takes per epoch. Both back-ends give ranks floor(n/world) or that
    + 1 samples; where the + 1 would start one more batch on some ranks, that batch (of one
    sample) is left out, different each epoch. Equal steps keep every replica's weights and
    momentum identical and make collectives inside an epoch safe."""
    return math.ceil((shards.num_samples("train") // world) / cfg.per_worker_batch)


# ---- one epoch ---------------------------------------------------------------------------

def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            t = t.to(device)
        dist.all_reduce(t)
    return t.cpu().tolist()


class EpochHooks(StepHooks):
    """Warm-up, progress (rank 0) and the in-epoch divergence checks (all ranks, in step)."""

    def __init__(self, state: State, cfg: TrainConfig, *, steps: int, device: torch.device,
                 progress: Progress | None):
        self.state, self.cfg, self.steps, self.device, self.progress = state, cfg, steps, device, progress
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.count = 0
        self.stopped: tuple[int, str] | None = None  # (step, reason)

    def before_step(self, step: int) -> None:
        scale = warmup_scale(self.cfg, self.state.epoch, step, self.steps)
        if scale is not None:
            set_lr(self.state.optimizer, self.cfg.lr * scale)
        elif self.state.epoch * self.steps + step <= self.cfg.warmup_epochs * self.steps:
            set_lr(self.state.optimizer, self.cfg.lr)  # the first step after the warm-up: the target exactly

    def after_step(self, step: int, loss: torch.Tensor, batch: int) -> bool:
        """True ends the epoch: after `steps` steps, or when the guard trips (all ranks agree:
        both follow from the same all-reduced numbers at the same step)."""
        lr = self.state.optimizer.param_groups[0]["lr"]
        if self.progress is not None:
            self.progress.update(step, loss, batch, lr)
        last = step + 1 >= self.steps
        if self.cfg.divergence_guard:
            self.loss_sum += loss.double() * batch
            self.count += batch
            guard = self.state.guard
            first = guard.reference is None and step == 0
            if first or (not last and self.cfg.print_freq > 0 and (step + 1) % self.cfg.print_freq == 0):
                total, count = _all_reduce_sum([float(self.loss_sum), float(self.count)], self.device)
                self.loss_sum.zero_()
                self.count = 0
                mean = total / max(count, 1)
                reason = guard.set_reference(mean) if first else guard.check(mean)
                if reason:
                    self.stopped = (step + 1, reason)
                    return True
        return last


@dataclass
class EpochResult:
    metrics: dict
    diverged: tuple[int, str] | None = None  # (step, reason)


def run_epoch(state: State, cfg: TrainConfig, shards: ShardSet, devices, rank: int, world: int,
              train_data: EpochLoaders, val, eval_seconds: float) -> EpochResult:
    net = ckpt_io.unwrap(state.model)
    gpu = devices[0].type == "cuda"
    amp_dtype = torch.bfloat16 if (cfg.amp and gpu) else None
    train_model = torch.compile(state.model) if cfg.compile else state.model
    eval_model = torch.compile(net) if cfg.compile else net
    loader = train_data.for_epoch(state.epoch)
    steps = steps_per_epoch(shards, cfg, world)
    progress = Progress(log, epoch=state.epoch, epochs=cfg.epochs, steps=steps, world=world,
                        print_freq=cfg.print_freq, loader=loader, eval_seconds=eval_seconds) if rank == 0 else None
    hooks = EpochHooks(state, cfg, steps=steps, device=devices[0], progress=progress)
    lr = state.optimizer.param_groups[0]["lr"]
    train = train_one_epoch(train_model, loader, state.optimizer, amp_dtype=amp_dtype, device=devices[0],
                            hooks=hooks).all_reduce()
    if hooks.stopped:
        return EpochResult({}, hooks.stopped)
    train_metrics = train.metrics("train")
    if cfg.divergence_guard:
        reason = state.guard.check(train_metrics["train_loss"])
        if reason:
            return EpochResult({}, (steps, reason))
    val_tally = evaluate(eval_model, val, amp_dtype=amp_dtype, device=devices[0]).all_reduce()
    val_metrics = val_tally.metrics("val")
    if plateau_judges(cfg, state.epoch):
        before = state.optimizer.param_groups[0]["lr"]
        state.scheduler.step(val_metrics["val_top1_error"])
        state.lr_drops += state.optimizer.param_groups[0]["lr"] < before
    state.epoch += 1
    metrics = {"epoch": state.epoch, "lr": lr, **train_metrics, **val_metrics,
               "images_per_s": train.count / max(train.seconds, 1e-9),
               "data_wait_share": train.wait_seconds / max(train.seconds, 1e-9),
               "epoch_seconds": train.seconds + val_tally.seconds, "eval_seconds": val_tally.seconds,
               "workers": world, "lr_drops": state.lr_drops}
    if cfg.ten_crop_every_epoch or (state.epoch == cfg.epochs and cfg.ten_crop_at_end):
        ten = evaluate(eval_model, eval_loader(shards, cfg, devices, "ten_crop", rank, world), amp_dtype=amp_dtype,
                       device=devices[0]).all_reduce()
        metrics.update(ten.metrics("val10crop"))
    return EpochResult(metrics)


def log_epoch(cfg: TrainConfig, m: dict) -> None:
    log.info("epoch %d/%d: train loss %.4f top-1 err %.3f | val top-1 err %.3f top-5 err %.3f | "
             "%.1f img/s, data wait %.0f%%, lr %g", m["epoch"], cfg.epochs, m["train_loss"], m["train_top1_error"],
             m["val_top1_error"], m["val_top5_error"], m["images_per_s"], 100 * m["data_wait_share"], m["lr"])


# ---- checkpoint ----------------------------------------------------------------------------

def save_checkpoint(state: State, cfg: TrainConfig, shards: ShardSet, run: RunFolder, metrics: dict, rank: int,
                    world: int, devices) -> None:
    """Every rank writes its part and reports it (Ray merges the parts into one folder); once
    every rank's upload has returned, rank 0 points latest_checkpoint.json at it."""
    import ray.train

    name = ckpt_io.checkpoint_dir_name(state.epoch)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if rank == 0:
            ckpt_io.save(folder, state.model, classes=shards.manifest["classes"],
                         normalization=shards.normalization(cfg.divide_by_std), epoch=state.epoch, metrics=metrics,
                         shards=ckpt_io.shards_meta(shards.root, shards.manifest), run=cfg.name,
                         train_config=cfg.to_json(), train_state=train_state_payload(state, cfg, world))
        ckpt_io.save_rank_state(folder, rank, rank_state_payload(state, rank, devices))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
    if world > 1:
        dist.barrier()
    if rank == 0:
        run.write_text(ckpt_io.POINTER, ckpt_io.pointer_json(name, state.epoch))
    state.last_checkpoint = run.uri + "/" + name


# ---- the worker ------------------------------------------------------------------------------

def quiet_ray_reports(cfg: TrainConfig) -> None:
    """Ray's per-report lines off the console (warnings stay), unless --ray-reports."""
    if cfg.ray_reports:
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


def record_worker(run: RunFolder, rank: int, devices) -> None:
    """Where each worker lives (ops, and the fault-tolerance test uses the pid)."""
    run.write_text(f".workers/rank{rank}.json", json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                             "devices": [str(d) for d in devices]}))


def train_loop_per_worker(config: dict) -> None:
    import ray.train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = TrainConfig.from_json(config)
    quiet_ray_reports(cfg)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    devices = worker_devices(cfg)
    if devices[0].type == "cpu":
        torch.set_num_threads(max(1, cfg.cpus_per_worker))
    run = RunFolder(cfg.storage_path, cfg.name)
    record_worker(run, rank, devices)

    shards = open_shard_set(cfg.data, cfg.input_size)
    cfg.loader = resolve_loader(cfg.loader)  # the driver's choice; a clear error where it cannot run
    state = new_state(cfg, build_model(cfg, shards.num_classes, devices))
    seed_rank(cfg.seed, rank)
    source, where = resume_source(cfg, run)
    if source is not None:
        with source as folder:
            resume(state, Path(folder), cfg, rank, devices)
        if rank == 0:
            log.info("resuming from %s after epoch %d", where, state.epoch)
    if rank == 0:
        run.truncate_metrics(state.epoch)  # epochs a dead run wrote past its checkpoint are redone
    state.model = wrap_ddp(state.model, world)

    train_data = train_loaders(shards, cfg, devices, rank, world)
    val = eval_loader(shards, cfg, devices, "center", rank, world)
    eval_seconds = 0.0
    while state.epoch < cfg.epochs:
        result = run_epoch(state, cfg, shards, devices, rank, world, train_data, val, eval_seconds)
        if result.diverged:
            step, reason = result.diverged
            if rank == 0:
                report = {"epoch": state.epoch + 1, "step": step, "reason": reason,
                          "last_good_checkpoint": state.last_checkpoint}
                run.write_text(DIVERGED, json.dumps(report, indent=2) + "\n")
                log.error("stopping: %s (epoch %d, step %d); last good checkpoint: %s", reason, state.epoch + 1,
                          step, state.last_checkpoint or "none")
            return
        eval_seconds = result.metrics["eval_seconds"]
        if rank == 0:
            log_epoch(cfg, result.metrics)
            run.append_metrics(result.metrics)
        save_checkpoint(state, cfg, shards, run, result.metrics, rank, world, devices)
