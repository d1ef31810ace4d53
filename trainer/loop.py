"""What each Ray Train worker runs: `train_loop_per_worker(config)`.

Data parallel across workers (DDP; rank r reads shard r of num_workers with DALI), and
inside each worker the paper's model parallelism: column A on the worker's first device,
column B on its second (one GPU: both on it; none: both on the CPU). A DDP module spanning
two devices must be built with device_ids=None.

Every epoch every worker calls ray.train.report (a barrier); rank 0 attaches the
checkpoint. On start, a worker resumes from ray.train.get_checkpoint() (the latest
complete one: Ray registers a checkpoint only once it is fully persisted).
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import tempfile
from pathlib import Path

import numpy as np
import torch

from trainer import checkpoint as ckpt_io
from trainer.config import TrainConfig
from trainer.data import DaliLoader, DataConfig, open_shard_set
from trainer.engine import evaluate, train_one_epoch
from trainer.model import AlexNet, AlexNetConfig
from trainer.runfolder import RunFolder

log = logging.getLogger("trainer.loop")


def _devices(cfg: TrainConfig) -> list[torch.device]:
    if cfg.gpus_per_worker <= 0:
        return [torch.device("cpu")]
    import ray.train.torch

    devices = ray.train.torch.get_devices()
    if not devices or devices[0].type != "cuda":
        raise RuntimeError(f"asked for {cfg.gpus_per_worker} GPU(s) per worker but the worker sees {devices}")
    return devices


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def build_model(cfg: TrainConfig, num_classes: int, devices: list[torch.device]) -> AlexNet:
    model_cfg = AlexNetConfig(num_classes=num_classes, input_size=cfg.input_size, columns=cfg.columns, lrn=cfg.lrn,
                              pool_kernel=cfg.pool_kernel, init=cfg.init)
    column_devices = tuple(devices[i % len(devices)] for i in range(cfg.columns))
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    return AlexNet(model_cfg, devices=column_devices)


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = TrainConfig.from_json(config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    devices = _devices(cfg)
    if devices[0].type == "cpu":
        torch.set_num_threads(max(1, cfg.cpus_per_worker))
    run = RunFolder(cfg.storage_path, cfg.name)
    # Where each worker lives (ops and the fault-tolerance test use the pid).
    run.write_text(f".workers/rank{rank}.json", json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                             "devices": [str(d) for d in devices]}))

    shards = open_shard_set(cfg.data, cfg.input_size)
    model = build_model(cfg, shards.num_classes, devices)
    # Same initial weights everywhere (seeded in build_model), then a per-rank stream: with
    # one seed, every worker would draw the same dropout masks for its batch, correlating
    # the "independent" samples the averaged gradient is made of.
    torch.manual_seed(cfg.seed * 1000 + 1 + rank)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    # lr /= 10 when val top-1 error stops improving; min_lr stops it after max_lr_drops drops.
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.1,
                                                           patience=cfg.lr_patience,
                                                           min_lr=cfg.lr * 0.1 ** cfg.max_lr_drops)
    start_epoch = 0
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as folder:
            restored, meta = ckpt_io.load_model(folder, devices=model.devices)
            model.load_state_dict(restored.state_dict())
            state = ckpt_io.load_train_state(Path(folder))
            if state is None:
                raise ckpt_io.CheckpointError(f"{folder} has no {ckpt_io.TRAIN_STATE}: cannot resume training")
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            _set_rng_state(state["rng"])
            start_epoch = int(meta["epoch"])
        if rank == 0:
            run.truncate_metrics(start_epoch)
            log.info("resuming from %s after epoch %d", resumed.path, start_epoch)

    ddp = world > 1
    if ddp:
        model = ray.train.torch.prepare_model(model, move_to_device=False,
                                              parallel_strategy_kwargs={"device_ids": None, "output_device": None})
    net = ckpt_io.unwrap(model)
    train_model = torch.compile(model) if cfg.compile else model
    eval_model = torch.compile(net) if cfg.compile else net

    gpu = devices[0].type == "cuda"
    amp_dtype = torch.bfloat16 if (cfg.amp and gpu) else None

    def loader(split: str, mode: str, seed: int) -> DaliLoader:
        per_worker = cfg.per_worker_batch if mode == "train" else max(1, min(cfg.per_worker_batch, 64))
        return DaliLoader(shards, split, DataConfig(
            mode=mode, batch_size=per_worker, input_size=cfg.input_size, shard_id=rank, num_shards=world,
            seed=seed, num_threads=cfg.loader_threads, device="gpu" if gpu else "cpu",
            device_id=devices[0].index if gpu else None, divide_by_std=cfg.divide_by_std))

    # A fresh augmentation stream after a restart, not a replay of epoch 0's.
    train_loader = loader("train", "train", cfg.seed + start_epoch)
    val_loader = loader("val", "center", cfg.seed)
    norm = shards.normalization(cfg.divide_by_std)

    for epoch in range(start_epoch, cfg.epochs):
        lr = optimizer.param_groups[0]["lr"]
        train = train_one_epoch(train_model, train_loader, optimizer, amp_dtype=amp_dtype, device=devices[0]).all_reduce()
        val = evaluate(eval_model, val_loader, amp_dtype=amp_dtype, device=devices[0]).all_reduce()

        val_err = val.metrics("val")["val_top1_error"]
        scheduler.step(val_err)
        metrics = {"epoch": epoch + 1, "lr": lr, **train.metrics("train"), **val.metrics("val"),
                   "images_per_s": train.count / max(train.seconds, 1e-9),
                   "data_wait_share": train.wait_seconds / max(train.seconds, 1e-9),
                   "epoch_seconds": train.seconds + val.seconds, "workers": world,
                   "lr_drops": int(round(np.log10(cfg.lr / optimizer.param_groups[0]["lr"])))}
        last = epoch + 1 == cfg.epochs
        if cfg.ten_crop_every_epoch or (last and cfg.ten_crop_at_end):
            ten = evaluate(eval_model, loader("val", "ten_crop", cfg.seed), amp_dtype=amp_dtype,
                           device=devices[0]).all_reduce()
            metrics.update(ten.metrics("val10crop"))
        if rank == 0:
            log.info("epoch %d/%d: train loss %.4f top-1 err %.3f | val top-1 err %.3f top-5 err %.3f | "
                     "%.1f img/s, data wait %.0f%%, lr %g", epoch + 1, cfg.epochs, metrics["train_loss"],
                     metrics["train_top1_error"], metrics["val_top1_error"], metrics["val_top5_error"],
                     metrics["images_per_s"], 100 * metrics["data_wait_share"], lr)
            run.append_metrics(metrics)
            with tempfile.TemporaryDirectory() as tmp:
                ckpt_io.save(Path(tmp), net, classes=shards.manifest["classes"], normalization=norm,
                             epoch=epoch + 1, metrics=metrics,
                             train_state={"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                          "rng": _rng_state(), "epoch": epoch + 1},
                             extra={"shards": {"path": str(shards.root), "image_size": shards.image_size,
                                               "jpeg_quality": shards.manifest.get("jpeg_quality"),
                                               "plan_fingerprint": shards.manifest.get("plan_fingerprint")},
                                    "run": cfg.name})
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics, checkpoint=None)
