"""The paper's optimiser and learning-rate schedule (section 5).

    v <- momentum * v - weight_decay * lr * w - lr * dL/dw
    w <- w + v

The learning rate is inside the velocity. torch.optim.SGD keeps it outside
(v <- momentum * v + dL/dw + weight_decay * w; w <- w - lr * v): the two rules agree while the
learning rate is constant and differ after every drop, where torch's rescales the whole
accumulated velocity at once and the paper's lets the old velocity decay at the old scale.

Weight decay applies to the weights, not the biases, as in cuda-convnet's layer definitions
and Caffe's bvlc_alexnet (decay_mult 0 on biases); `decay_biases=True` decays everything.

The schedule: lr *= lr_factor (0.1) whenever the validation top-1 error has not improved for
lr_patience epochs, at most max_lr_drops (3) times (torch's ReduceLROnPlateau with a min_lr),
after an optional linear warm-up (`warmup_epochs`, 0 in the paper). The schedule judges only
epochs trained wholly after the warm-up: with `warmup_epochs=1.5` the first is epoch 3 (index 2),
since epoch 2's val error still reflects half an epoch at a rising lr. Every function reads
the recipe section (trainer.config.RecipeConfig); a resumed run's changed settings reach the
optimizer and schedule through trainer.resume.apply_changes.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from trainer.config import RecipeConfig


class PaperSGD(torch.optim.Optimizer):
    """SGD with momentum, the update rule of the paper's section 5 (see the module docstring).

    Per step, per (device, dtype) group, four foreach kernels over all tensors at once; no
    per-parameter kernel launches. State: one `velocity` tensor per parameter."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError("lr, momentum and weight_decay must be >= 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
            buckets: dict = defaultdict(lambda: ([], [], []))
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "velocity" not in state:
                    state["velocity"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params, grads, velocities = buckets[(p.device, p.dtype)]
                params.append(p)
                grads.append(p.grad)
                velocities.append(state["velocity"])
            for params, grads, velocities in buckets.values():
                torch._foreach_mul_(velocities, momentum)
                if decay:
                    torch._foreach_add_(velocities, params, alpha=-decay * lr)
                torch._foreach_add_(velocities, grads, alpha=-lr)
                torch._foreach_add_(params, velocities)
        return loss


def param_groups(model: torch.nn.Module, weight_decay: float, decay_biases: bool) -> list[dict]:
    """Two groups, always (so an optimizer state loads whatever the switch): the weights with
    weight decay, the biases with it only if decay_biases."""
    weights = [p for n, p in model.named_parameters() if not n.endswith("bias")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [
        {"params": weights, "weight_decay": weight_decay, "name": "weights"},
        {"params": biases, "weight_decay": weight_decay if decay_biases else 0.0, "name": "biases"},
    ]


def build_optimizer(model: torch.nn.Module, recipe: RecipeConfig) -> PaperSGD:
    return PaperSGD(
        param_groups(model, recipe.weight_decay, recipe.decay_biases), lr=recipe.lr, momentum=recipe.momentum
    )


def min_lr(recipe: RecipeConfig) -> float:
    return recipe.lr * recipe.lr_factor**recipe.max_lr_drops


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: RecipeConfig):
    """lr *= lr_factor when val top-1 error stops improving; min_lr ends it after max_lr_drops."""
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=recipe.lr_factor, patience=recipe.lr_patience, min_lr=min_lr(recipe)
    )


def warmup_scale(recipe: RecipeConfig, epoch: int, step: int, steps_per_epoch: int) -> float | None:
    """The warm-up factor for step `step` (0-based) of `epoch`, or None once warm-up is over:
    linear from 1/(warmup steps) to 1."""
    total = recipe.warmup_epochs * steps_per_epoch
    done = epoch * steps_per_epoch + step + 1
    if total <= 0 or done > total:
        return None
    return done / total


def plateau_judges(recipe: RecipeConfig, epoch: int) -> bool:
    """Whether the plateau schedule sees the val error of `epoch` (0-based): only epochs that
    began after the warm-up had ended."""
    return epoch >= recipe.warmup_epochs


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
