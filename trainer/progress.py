"""Progress inside an epoch (rank 0): a line every `print_freq` steps and at least every
PROGRESS_MAX_S seconds, as torchvision's MetricLogger prints, with the ETA of the epoch and
of the run. Local numbers only (no collectives), so printing never makes workers wait. Each
line's numbers also go to `on_line` (the run's TensorBoard steps, trainer.board)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import timedelta

import torch

PROGRESS_MAX_S = 60.0


def _hms(seconds: float) -> str:
    return str(timedelta(seconds=int(max(0.0, seconds))))


class Progress:
    def __init__(
        self,
        log: logging.Logger,
        *,
        epoch: int,
        epochs: int,
        steps: int,
        world: int,
        print_freq: int,
        loader,
        eval_seconds: float = 0.0,
        max_interval_s: float = PROGRESS_MAX_S,
        on_line: Callable[[int, float, float], None] | None = None,
    ):
        self.log, self.epoch, self.epochs, self.steps, self.world = log, epoch, epochs, steps, world
        self.print_freq, self.loader, self.eval_seconds, self.max_interval_s = (
            print_freq,
            loader,
            eval_seconds,
            max_interval_s,
        )
        self.t0 = self.last_t = time.perf_counter()
        self.wait0 = getattr(loader, "wait_s", 0.0)
        self.images = 0
        self.lines = 0
        self.on_line = on_line  # (train step since the run began, loss, img/s) of each line: trainer.board

    def due(self, step: int) -> bool:
        """Step `step` (0-based) ends an interval: every print_freq steps, or 60 s since the last line."""
        n = step + 1
        return (
            self.print_freq > 0 and n % self.print_freq == 0
        ) or time.perf_counter() - self.last_t >= self.max_interval_s

    def update(self, step: int, loss: torch.Tensor, batch: int, lr: float) -> None:
        self.images += batch
        if not self.due(step) or step + 1 == self.steps:  # the epoch line covers the last step
            return
        now = time.perf_counter()
        self.last_t = now
        elapsed = now - self.t0
        done = step + 1
        per_step = elapsed / done
        epoch_left = per_step * (self.steps - done)
        epoch_total = per_step * self.steps + self.eval_seconds
        run_left = epoch_left + self.eval_seconds + epoch_total * (self.epochs - self.epoch - 1)
        wait = getattr(self.loader, "wait_s", 0.0) - self.wait0
        self.lines += 1
        loss_value, images_per_s = float(loss), self.images * self.world / max(elapsed, 1e-9)
        if self.on_line is not None:
            self.on_line(self.epoch * self.steps + done, loss_value, images_per_s)
        self.log.info(
            "epoch %d/%d step %d/%d | %.1f img/s | data wait %.0f%% | loss %.4f | lr %.3g | ETA epoch %s, run %s",
            self.epoch + 1,
            self.epochs,
            done,
            self.steps,
            images_per_s,
            100 * wait / max(elapsed, 1e-9),
            loss_value,
            lr,
            _hms(epoch_left),
            _hms(run_left),
        )
