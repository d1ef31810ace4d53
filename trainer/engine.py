"""One epoch of training and one evaluation pass: plain functions (as torchvision's
references/classification), reused by the Ray worker loop and by tests.

Counts, not averages, are returned so that data-parallel workers can sum them
(`all_reduce`) and every rank computes the same job-wide metrics.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F


@dataclass
class Tally:
    loss_sum: float = 0.0
    top1: int = 0
    top5: int = 0
    count: int = 0
    seconds: float = 0.0
    wait_seconds: float = 0.0

    _acc: torch.Tensor | None = None  # [loss_sum, top1, top5] on the compute device

    def add(self, logits_or_probs: torch.Tensor, labels: torch.Tensor, loss_sum: torch.Tensor) -> None:
        """Accumulate on the device: no host sync per step (a GPU keeps running ahead)."""
        k = min(5, logits_or_probs.shape[1])
        hit = logits_or_probs.topk(k, dim=1).indices == labels[:, None]
        step = torch.stack(
            [loss_sum.detach().double().reshape(()), hit[:, 0].sum().double(), hit.any(dim=1).sum().double()]
        )
        self._acc = step if self._acc is None else self._acc + step
        self.count += int(labels.numel())

    def finalize(self) -> Tally:
        if self._acc is not None:
            loss_sum, top1, top5 = self._acc.tolist()
            self.loss_sum, self.top1, self.top5 = self.loss_sum + loss_sum, self.top1 + int(top1), self.top5 + int(top5)
            self._acc = None
        return self

    def all_reduce(self) -> Tally:
        """Sum counts over all workers (no-op without a process group)."""
        self.finalize()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([self.loss_sum, self.top1, self.top5, self.count], dtype=torch.float64)
            backend = dist.get_backend()
            device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
            t = t.to(device)
            dist.all_reduce(t)
            self.loss_sum, top1, top5, count = t.tolist()
            self.top1, self.top5, self.count = int(top1), int(top5), int(count)
            # time: the slowest worker's
            s = torch.tensor([self.seconds, self.wait_seconds], dtype=torch.float64, device=device)
            dist.all_reduce(s, op=dist.ReduceOp.MAX)
            self.seconds, self.wait_seconds = s.tolist()
        return self

    def metrics(self, prefix: str) -> dict:
        self.finalize()
        n = max(self.count, 1)
        return {
            f"{prefix}_loss": self.loss_sum / n,
            f"{prefix}_top1_error": 1 - self.top1 / n,
            f"{prefix}_top5_error": 1 - self.top5 / n,
            f"{prefix}_images": self.count,
        }


def _join(model: torch.nn.Module):
    """Workers may get one batch more or less than each other (exact epochs); DDP's Join
    lets the early finishers shadow the collective calls instead of hanging."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        from torch.distributed.algorithms.join import Join

        return Join([model])
    return contextlib.nullcontext()


class StepHooks:
    """What the training loop does around each step without the engine knowing it: the
    learning-rate warm-up (`before_step`), progress lines and the divergence guard
    (`after_step`, which returns True to end the epoch now: every rank must agree)."""

    def before_step(self, step: int) -> None:
        pass

    def after_step(self, step: int, loss: torch.Tensor, batch: int) -> bool:
        return False


def train_one_epoch(
    model,
    loader,
    optimizer,
    *,
    amp_dtype: torch.dtype | None = None,
    device: torch.device | None = None,
    hooks: StepHooks | None = None,
) -> Tally:
    """One pass over `loader`. `hooks.after_step` gets the step's loss as a device tensor
    (reading it forces a sync: do that every N steps, not every step)."""
    model.train()
    tally = Tally()
    wait0 = getattr(loader, "wait_s", 0.0)
    t0 = time.perf_counter()
    with _join(model):
        for step, (images, labels) in enumerate(loader):
            if hooks is not None:
                hooks.before_step(step)
            if device is not None and images.device != device:
                images = images.to(device, non_blocking=True)
            with torch.autocast(
                device_type=(device or images.device).type,
                dtype=amp_dtype or torch.float32,
                enabled=amp_dtype is not None,
            ):
                logits = model(images)
                labels = labels.to(logits.device, non_blocking=True)
                loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            tally.add(logits.detach().float(), labels, loss.detach() * labels.numel())
            if hooks is not None and hooks.after_step(step, loss.detach(), int(labels.numel())):
                break
    tally.finalize()
    tally.seconds = time.perf_counter() - t0
    tally.wait_seconds = getattr(loader, "wait_s", 0.0) - wait0
    return tally


@torch.no_grad()
def evaluate(model, loader, *, amp_dtype: torch.dtype | None = None, device: torch.device | None = None) -> Tally:
    """Top-1/top-5 over the loader. Batches shaped (N, C, 3, S, S) are multi-crop: the
    softmax is averaged over the C crops (the paper's 10-crop test)."""
    model.eval()
    tally = Tally()
    t0 = time.perf_counter()
    for images, labels in loader:
        if device is not None and images.device != device:
            images = images.to(device, non_blocking=True)
        crops = images.shape[1] if images.dim() == 5 else 1
        flat = images.flatten(0, 1) if crops > 1 else images
        with torch.autocast(
            device_type=(device or images.device).type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
        ):
            logits = model(flat).float()
        labels = labels.to(logits.device)
        probs = logits.softmax(dim=1).view(-1, crops, logits.shape[1]).mean(dim=1)
        loss = F.nll_loss(probs.clamp_min(1e-12).log(), labels, reduction="sum")
        tally.add(probs, labels, loss)
    tally.finalize()
    tally.seconds = time.perf_counter() - t0
    return tally
