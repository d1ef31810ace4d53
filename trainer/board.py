"""TensorBoard event files of a run, written by rank 0 into the run folder beside metrics.jsonl:

    tensorboard --logdir STORAGE_PATH      (each run folder is a run in TensorBoard)

RUN/ (TensorBoard's step: the epoch, 1-based, as metrics.jsonl numbers it): per epoch, from
its metrics row (EPOCH_SCALARS), train and val loss, top-1 and top-5 error, the 10-crop errors
when the epoch measured them, the learning rate, img/s and the data-wait share; at the end of
the run the conv1 kernels (the paper's Figure 3) as an image and the learning curves as a
figure. RUN/steps/ (TensorBoard's step: the train step since the run began; a run of its own,
"RUN/steps", so that each series has one kind of step): every --print-freq steps, with the
progress line, step/loss and step/images_per_s.

A resubmitted run adds event files of its own, which begin by telling TensorBoard to hide what
the earlier files hold from the resumed epoch (and its first step) on: epochs a dead run wrote
past its last checkpoint are trained again, and show once, as metrics.jsonl keeps them
(trainer.runfolder.truncate_metrics). STORAGE_PATH may be a URI TensorBoard's file layer
writes (s3:// with boto3, others through fsspec). TensorBoard never stops a run: without the
`tensorboard` package, or where the files cannot be written, it goes on without them, saying so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from trainer.figures import conv1_image, learning_curves_figure

log = logging.getLogger("trainer.board")

# metrics.jsonl key -> TensorBoard tag.
EPOCH_SCALARS = {
    "train_loss": "train/loss",
    "train_top1_error": "train/top1_error",
    "train_top5_error": "train/top5_error",
    "val_loss": "val/loss",
    "val_top1_error": "val/top1_error",
    "val_top5_error": "val/top5_error",
    "val10crop_top1_error": "val10crop/top1_error",
    "val10crop_top5_error": "val10crop/top5_error",
    "val10crop_loss": "val10crop/loss",
    "lr": "lr",
    "images_per_s": "throughput/images_per_s",
    "data_wait_share": "throughput/data_wait_share",
}
STEP_LOSS, STEP_IMAGES_PER_S = "step/loss", "step/images_per_s"
CONV1_KERNELS, LEARNING_CURVES = "figures/conv1_kernels", "figures/learning_curves"
STEPS_DIR = "steps"
FLUSH_S = 30  # what a live TensorBoard sees is at most this old (and every epoch is flushed)


class Board:
    """Rank 0's writers of a run's event files (epochs in RUN/, steps in RUN/steps/, made at
    the first progress line: a run without them has no empty "steps" run)."""

    def __init__(self, writer: Callable[..., Any], run: str, resumed_epoch: int, steps_per_epoch: int):
        resumed = resumed_epoch > 0
        self._writer = writer
        self._steps_dir = f"{run.rstrip('/')}/{STEPS_DIR}"
        self._steps_purge = resumed_epoch * steps_per_epoch + 1 if resumed else None
        self.epochs = writer(log_dir=run, flush_secs=FLUSH_S, purge_step=resumed_epoch + 1 if resumed else None)
        self.steps: Any = None
        self.broken = False

    @classmethod
    def open(cls, run: str, *, resumed_epoch: int = 0, steps_per_epoch: int = 0) -> Board | None:
        """Writers for the run folder `run`; a run resumed after `resumed_epoch` epochs of
        `steps_per_epoch` steps hides what earlier event files hold past that point."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # the trainer extra brings it; a bare environment may lack it
            log.warning("no TensorBoard event files for this run (%s): pip install tensorboard", exc)
            return None
        try:
            return cls(SummaryWriter, run, resumed_epoch, steps_per_epoch)
        except Exception as exc:  # a storage URI TensorBoard's file layer cannot write, say
            log.warning("no TensorBoard event files for this run: cannot write them to %s (%s)", run, exc)
            return None

    def _failed(self, exc: Exception) -> None:
        """TensorBoard is a view of the run, never a reason to stop it: say so once, write no more."""
        log.warning("TensorBoard event files stop here: %s: %s", type(exc).__name__, exc)
        self.broken = True

    def epoch(self, row: dict[str, Any]) -> None:
        """One epoch's metrics row (what metrics.jsonl gets)."""
        if self.broken:
            return
        try:
            self._epoch(row)
        except Exception as exc:
            self._failed(exc)

    def _epoch(self, row: dict[str, Any]) -> None:
        for key, tag in EPOCH_SCALARS.items():
            if key in row:
                self.epochs.add_scalar(tag, float(row[key]), global_step=int(row["epoch"]))
        self.epochs.flush()
        if self.steps is not None:
            self.steps.flush()

    def step(self, step: int, loss: float, images_per_s: float) -> None:
        """A progress line's numbers (trainer.progress)."""
        if self.broken:
            return
        try:
            self._step(step, loss, images_per_s)
        except Exception as exc:
            self._failed(exc)

    def _step(self, step: int, loss: float, images_per_s: float) -> None:
        if self.steps is None:
            self.steps = self._writer(log_dir=self._steps_dir, flush_secs=FLUSH_S, purge_step=self._steps_purge)
        self.steps.add_scalar(STEP_LOSS, loss, global_step=step)
        self.steps.add_scalar(STEP_IMAGES_PER_S, images_per_s, global_step=step)

    def finish(self, model: Any, rows: list[dict[str, Any]]) -> None:
        """The end of a run: the conv1 kernels and the learning curves of all its epochs."""
        if self.broken or not rows:
            return
        try:
            self._finish(model, rows)
        except Exception as exc:
            self._failed(exc)

    def _finish(self, model: Any, rows: list[dict[str, Any]]) -> None:
        last = int(rows[-1]["epoch"])
        self.epochs.add_image(CONV1_KERNELS, conv1_image(model), global_step=last, dataformats="HWC")
        self.epochs.add_figure(LEARNING_CURVES, learning_curves_figure(rows), global_step=last, close=True)
        self.epochs.flush()

    def close(self) -> None:
        for writer in (self.epochs, self.steps):
            if writer is not None:
                try:
                    writer.close()
                except Exception as exc:
                    self._failed(exc)
