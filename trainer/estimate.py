"""How long a run will take, from a few measured steps of the training loop itself, and the
CPU gate that uses it.

- `SyntheticBatches`: one fixed random batch, already on the device, `steps` times (no data
  wait: the model-only ceiling). benchmarks/gpu_check.py feeds the same loop with it.
- `time_train_steps(model, optimizer, batches, ...)`: seconds per step of
  `trainer.engine.train_one_epoch` (the loop the workers run) over any model and batches;
  `seconds_per_step(cfg, device)`: the run's own model, optimizer, precision and batch.
- `cpu_gate(cfg, train_samples, yes)`: a run on the CPU (no GPU in the cluster, or
  `--gpus-per-worker 0`) over a full-size shard set (FULL_SIZE_SAMPLES train images or more;
  ImageNet has 1.28M, the built-in sample 297) would run for days to months: it measures a few
  steps here, states the time per epoch and per run, and refuses unless `--yes` (never a silent
  start). A terminal cannot be asked inside `ray job submit`, hence the flag.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator

import torch

from trainer.config import TrainConfig
from trainer.engine import train_one_epoch
from trainer.model import AlexNet
from trainer.optim import build_optimizer

log = logging.getLogger("trainer.estimate")
FULL_SIZE_SAMPLES = 10_000  # train images: at or over it, a CPU run needs --yes
GATE_STEPS = 2  # measured steps (after one warm-up step)


class CpuRunRefused(RuntimeError):
    """A full-size run on the CPU without --yes."""


class SyntheticBatches:
    """`steps` times one random batch (N, 3, S, S) of centred pixel values and its labels, on
    `device`; `wait_s` stays 0 (nothing is loaded)."""

    def __init__(
        self, batch: int, size: int, classes: int, steps: int, device: torch.device, channels_last: bool = False
    ):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 3, size, size, generator=g) * 60
        self.x = x.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        self.y = torch.randint(0, classes, (batch,), generator=g).to(device)
        self.steps = steps
        self.wait_s = 0.0

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(self.steps):
            yield self.x, self.y


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_train_steps(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Callable[[int], Iterable],
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    steps: int,
    warmup: int = 1,
) -> tuple[float, float]:
    """(seconds per step over `steps` steps, seconds the `warmup` steps took: torch.compile's
    compile time, cuDNN's algorithm search) of `train_one_epoch` over `batches(n)`."""

    def run(n: int) -> float:
        loader = batches(n)
        synchronize(device)
        t0 = time.perf_counter()
        train_one_epoch(model, loader, optimizer, amp_dtype=amp_dtype, device=device)
        synchronize(device)
        return time.perf_counter() - t0

    warm = run(warmup) if warmup else 0.0
    return run(steps) / steps, warm


def seconds_per_step(cfg: TrainConfig, device: torch.device, steps: int = GATE_STEPS, warmup: int = 1) -> float:
    """The mean time of `steps` training steps of this config's model at its per-worker batch on
    `device` (both columns on it), after `warmup` steps."""
    torch.manual_seed(cfg.recipe.seed)
    model: torch.nn.Module = AlexNet(cfg.model, devices=(device,) * cfg.model.columns)
    channels_last = cfg.runtime.channels_last is True and device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch documents and accepts memory_format; its overloads omit it
    amp = torch.bfloat16 if (cfg.runtime.amp is True and device.type == "cuda") else None

    def batches(n: int) -> SyntheticBatches:
        size, classes = cfg.model.input_size, cfg.model.num_classes
        return SyntheticBatches(cfg.per_worker_batch, size, classes, n, device, channels_last)

    optimizer = build_optimizer(model, cfg.recipe)
    return time_train_steps(model, optimizer, batches, device=device, amp_dtype=amp, steps=steps, warmup=warmup)[0]


def epoch_seconds(step_s: float, train_samples: int, workers: int, per_worker_batch: int) -> float:
    """An epoch's train steps (every worker steps at once) at `step_s` each."""
    return math.ceil((train_samples // workers) / per_worker_batch) * step_s


def human(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


def cpu_gate(cfg: TrainConfig, train_samples: int, yes: bool, full_size: int = FULL_SIZE_SAMPLES) -> None:
    """On the CPU over a full-size shard set: measure, warn with the estimate, and refuse
    (CpuRunRefused) unless `yes`. Does nothing on GPUs or on small shard sets."""
    runtime = cfg.runtime
    workers, gpus = runtime.layout
    if gpus != 0 or train_samples < full_size:
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, runtime.cpus_per_worker))  # as each worker will (trainer.worker)
    try:
        step_s = seconds_per_step(cfg, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    epoch_s = epoch_seconds(step_s, train_samples, workers, cfg.per_worker_batch)
    message = (
        f"no GPU: this run would train on the CPU ({workers} worker(s) x {runtime.cpus_per_worker} "
        f"CPU(s)) over {train_samples:,} train images. Measured here: {step_s:.1f} s per step of "
        f"{cfg.per_worker_batch} images, so about {human(epoch_s)} per epoch and {human(epoch_s * cfg.recipe.epochs)} "
        f"for the recipe's {cfg.recipe.epochs} epochs"
    )
    if yes:
        log.warning("%s; starting anyway (--yes)", message)
        return
    raise CpuRunRefused(
        f"{message}. Not started: on a Ray cluster with GPUs the run finds them by itself "
        "(--gpus-per-worker auto); --yes trains on the CPU anyway"
    )
