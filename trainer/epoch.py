"""One epoch of a Ray Train worker, and what happens around its steps.

`run_epoch`: epoch e's train batches (trainer.loaders.EpochLoaders), `train_one_epoch` for
exactly `steps_per_epoch` steps on every rank, the warm-up and the in-epoch divergence checks
as step hooks (`EpochHooks`), the epoch-end guard check, the centre-crop evaluation, counts
all-reduced over the workers, the plateau step (not during the warm-up), the epoch's metrics
row; the 10-crop evaluation after the last epoch (or every epoch, if asked). Rank 0's progress
lines also go to the run's TensorBoard `board` (trainer.board).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from trainer.board import Board
from trainer.config import RecipeConfig, RuntimeConfig
from trainer.context import WorkerContext
from trainer.engine import StepHooks, evaluate, train_one_epoch
from trainer.loaders import EpochLoaders, InputLoader
from trainer.optim import plateau_judges, set_lr, warmup_scale
from trainer.progress import Progress
from trainer.resume import State

log = logging.getLogger("trainer.epoch")


@dataclass(frozen=True)
class Models:
    """The model as each pass runs it: training through DDP, evaluation on the bare network
    (no collectives); both compiled once at setup with --compile."""

    train: torch.nn.Module
    eval: torch.nn.Module


@dataclass
class EpochResult:
    metrics: dict[str, Any]
    diverged: tuple[int, str] | None = None  # (step, reason)


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            t = t.to(device)
        dist.all_reduce(t)
    return t.cpu().tolist()


class EpochHooks(StepHooks):
    """Warm-up, progress (rank 0) and the in-epoch divergence checks (all ranks, in step)."""

    def __init__(
        self,
        state: State,
        recipe: RecipeConfig,
        runtime: RuntimeConfig,
        *,
        steps: int,
        device: torch.device,
        progress: Progress | None,
    ):
        self.state, self.recipe, self.runtime, self.steps = state, recipe, runtime, steps
        self.device, self.progress = device, progress
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.count = 0
        self.stopped: tuple[int, str] | None = None  # (step, reason)

    def before_step(self, step: int) -> None:
        scale = warmup_scale(self.recipe, self.state.epoch, step, self.steps)
        if scale is not None:
            set_lr(self.state.optimizer, self.recipe.lr * scale)
        elif self.state.epoch * self.steps + step <= self.recipe.warmup_epochs * self.steps:
            set_lr(self.state.optimizer, self.recipe.lr)  # the first step after the warm-up: the target exactly

    def after_step(self, step: int, loss: torch.Tensor, batch: int) -> bool:
        """True ends the epoch: after `steps` steps, or when the guard trips (all ranks agree:
        both follow from the same all-reduced numbers at the same step)."""
        lr = self.state.optimizer.param_groups[0]["lr"]
        if self.progress is not None:
            self.progress.update(step, loss, batch, lr)
        last = step + 1 >= self.steps
        if self.runtime.divergence_guard:
            self.loss_sum += loss.double() * batch
            self.count += batch
            guard = self.state.guard
            first = guard.reference is None and step == 0
            freq = self.runtime.print_freq
            if first or (not last and freq > 0 and (step + 1) % freq == 0):
                total, count = _all_reduce_sum([float(self.loss_sum), float(self.count)], self.device)
                self.loss_sum.zero_()
                self.count = 0
                mean = total / max(count, 1)
                reason = guard.set_reference(mean) if first else guard.check(mean)
                if reason:
                    self.stopped = (step + 1, reason)
                    return True
        return last


def run_epoch(
    state: State,
    ctx: WorkerContext,
    models: Models,
    train_data: EpochLoaders,
    val: InputLoader,
    eval_seconds: float,
    board: Board | None = None,
) -> EpochResult:
    recipe, runtime = ctx.cfg.recipe, ctx.cfg.runtime
    loader = train_data.for_epoch(state.epoch)
    steps = ctx.steps_per_epoch()
    progress = (
        Progress(
            log,
            epoch=state.epoch,
            epochs=recipe.epochs,
            steps=steps,
            world=ctx.world,
            print_freq=runtime.print_freq,
            loader=loader,
            eval_seconds=eval_seconds,
            on_line=board.step if board is not None else None,
        )
        if ctx.leader
        else None
    )
    hooks = EpochHooks(state, recipe, runtime, steps=steps, device=ctx.device, progress=progress)
    lr = state.optimizer.param_groups[0]["lr"]
    train = train_one_epoch(
        models.train, loader, state.optimizer, amp_dtype=ctx.amp_dtype, device=ctx.device, hooks=hooks
    ).all_reduce()
    if hooks.stopped:
        return EpochResult({}, hooks.stopped)
    train_metrics = train.metrics("train")
    if runtime.divergence_guard:
        reason = state.guard.check(train_metrics["train_loss"])
        if reason:
            return EpochResult({}, (steps, reason))
    val_tally = evaluate(models.eval, val, amp_dtype=ctx.amp_dtype, device=ctx.device).all_reduce()
    val_metrics = val_tally.metrics("val")
    if plateau_judges(recipe, state.epoch):
        before = state.optimizer.param_groups[0]["lr"]
        state.scheduler.step(val_metrics["val_top1_error"])
        state.lr_drops += state.optimizer.param_groups[0]["lr"] < before
    state.epoch += 1
    metrics = {
        "epoch": state.epoch,
        "lr": lr,
        **train_metrics,
        **val_metrics,
        "images_per_s": train.count / max(train.seconds, 1e-9),
        "data_wait_share": train.wait_seconds / max(train.seconds, 1e-9),
        "epoch_seconds": train.seconds + val_tally.seconds,
        "eval_seconds": val_tally.seconds,
        "workers": ctx.world,
        "lr_drops": state.lr_drops,
    }
    if recipe.ten_crop_every_epoch or (state.epoch == recipe.epochs and recipe.ten_crop_at_end):
        ten = evaluate(
            models.eval, ctx.eval_loader("ten_crop"), amp_dtype=ctx.amp_dtype, device=ctx.device
        ).all_reduce()
        metrics.update(ten.metrics("val10crop"))
    return EpochResult(metrics)


def log_epoch(recipe: RecipeConfig, m: dict[str, Any]) -> None:
    log.info(
        "epoch %d/%d: train loss %.4f top-1 err %.3f | val top-1 err %.3f top-5 err %.3f | "
        "%.1f img/s, data wait %.0f%%, lr %g",
        m["epoch"],
        recipe.epochs,
        m["train_loss"],
        m["train_top1_error"],
        m["val_top1_error"],
        m["val_top5_error"],
        m["images_per_s"],
        100 * m["data_wait_share"],
        m["lr"],
    )
