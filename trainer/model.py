"""The AlexNet of Krizhevsky, Sutskever & Hinton (NIPS 2012), as the paper built it.

Two columns ("GPU A" and "GPU B"), each holding half the kernels of every layer, each on its
own device. Activations cross between columns only into conv3 and into fc6, fc7 and fc8;
conv1, conv2, conv4 and conv5 see only their own column. This file is only the model: no
I/O, no Ray, no DALI.

Input size: 227x227. The paper says 224, but its layer arithmetic (11x11 kernels, stride 4,
no padding -> 55x55) only works for 227; with 227 every size in the paper holds:
55 -> 27 -> 27 -> 13 -> 13 -> 13 -> 13 -> 6, and fc6 sees 256 * 6 * 6 = 9216 inputs.
Other sizes work (fc6's width follows from the arithmetic), 227 is the default.

Parameters of the paper layout: 60,965,224.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from trainer.lrn import PaperLRN

INITS = ("paper", "kaiming")


@dataclass(frozen=True)
class AlexNetConfig:
    """Architecture arguments: what a checkpoint stores and serving rebuilds the model from.

    The ablation switches are the variants the paper measured (section 3):
    - columns=1: one column with half the kernels of the conv layers (3.2: +1.7%/+1.2% error).
      As the paper's footnote says, conv5 and the fully connected layers keep their full
      size in that net, so the two nets have about the same number of parameters.
    - lrn=False: no local response normalisation (3.3: +1.4%/+1.2%).
    - pool_kernel=2: non-overlapping 2/2 pooling instead of 3/2 (3.4: +0.4%/+0.3%).

    init: "paper" (section 5, the default) or "kaiming" (He et al. 2015: N(0, 2/fan_in),
    biases 0, fc8 N(0, 0.01)). The paper's initialisation needs many epochs to leave chance
    level on a small dataset; the CPU sample recipe uses "kaiming" (trainer/recipes/sample.toml).
    """

    num_classes: int = 1000
    input_size: int = 227
    columns: int = 2
    lrn: bool = True
    pool_kernel: int = 3
    pool_stride: int = 2
    dropout: float = 0.5
    # Paper 3.3: k=2, n=5, alpha=1e-4, beta=0.75 in the paper's own formula (alpha NOT divided by n).
    lrn_size: int = 5
    lrn_alpha: float = 1e-4
    lrn_beta: float = 0.75
    lrn_k: float = 2.0
    init: str = "paper"

    def __post_init__(self):
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}")
        if self.columns not in (1, 2):
            raise ValueError("columns must be 2 (the paper's layout) or 1 (its one-GPU ablation)")
        if self.num_classes < 2:
            raise ValueError("num_classes must be >= 2")
        if self.feature_map_size() < 1:
            raise ValueError(f"input_size {self.input_size} is too small for AlexNet")

    def spatial_sizes(self) -> dict[str, int]:
        """Spatial size after each stage, from the layer arithmetic."""
        pool = lambda s: (s - self.pool_kernel) // self.pool_stride + 1  # noqa: E731
        conv1 = (self.input_size - 11) // 4 + 1
        pool1 = pool(conv1)
        conv2 = pool1  # 5x5, pad 2
        pool2 = pool(conv2)
        return {
            "conv1": conv1,
            "pool1": pool1,
            "conv2": conv2,
            "pool2": pool2,
            "conv3": pool2,
            "conv4": pool2,
            "conv5": pool2,
            "pool5": pool(pool2),
        }

    def feature_map_size(self) -> int:
        conv1 = (self.input_size - 11) // 4 + 1
        if conv1 < self.pool_kernel:
            return 0
        return self.spatial_sizes()["pool5"]

    def widths(self) -> list[ColumnWidths]:
        """Kernels per column for each layer."""
        if self.columns == 2:
            half = self.num_classes // 2
            return [
                ColumnWidths(48, 128, 192, 192, 128, 2048, 2048, self.num_classes - half),
                ColumnWidths(48, 128, 192, 192, 128, 2048, 2048, half),
            ]
        return [ColumnWidths(48, 128, 192, 192, 256, 4096, 4096, self.num_classes)]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> AlexNetConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class ColumnWidths:
    conv1: int
    conv2: int
    conv3: int
    conv4: int
    conv5: int
    fc6: int
    fc7: int
    fc8: int


class Column(nn.Module):
    """One column ("GPU"): its half of every layer. Inputs of conv3/fc6/fc7/fc8 are the
    concatenation of all columns' outputs, so those layers are sized for all of them."""

    def __init__(self, cfg: AlexNetConfig, w: ColumnWidths, total: ColumnWidths, device: torch.device):
        super().__init__()
        kw: dict[str, Any] = {"device": device}
        fmap = cfg.feature_map_size()
        self.conv1 = nn.Conv2d(3, w.conv1, 11, stride=4, **kw)
        self.conv2 = nn.Conv2d(w.conv1, w.conv2, 5, padding=2, **kw)  # own column only
        self.conv3 = nn.Conv2d(total.conv2, w.conv3, 3, padding=1, **kw)  # both columns
        self.conv4 = nn.Conv2d(w.conv3, w.conv4, 3, padding=1, **kw)  # own column only
        self.conv5 = nn.Conv2d(w.conv4, w.conv5, 3, padding=1, **kw)  # own column only
        self.fc6 = nn.Linear(total.conv5 * fmap * fmap, w.fc6, **kw)  # both columns
        self.fc7 = nn.Linear(total.fc6, w.fc7, **kw)  # both columns
        self.fc8 = nn.Linear(total.fc7, w.fc8, **kw)  # both columns

        def make_lrn() -> nn.Module:
            return PaperLRN(cfg.lrn_size, cfg.lrn_alpha, cfg.lrn_beta, cfg.lrn_k) if cfg.lrn else nn.Identity()

        self.norm1, self.norm2 = make_lrn(), make_lrn()  # each column normalises its own maps
        self.pool = nn.MaxPool2d(cfg.pool_kernel, cfg.pool_stride)
        self.drop = nn.Dropout(cfg.dropout)

    def block1(self, x: torch.Tensor) -> torch.Tensor:
        """conv1 -> ReLU -> LRN -> pool -> conv2 -> ReLU -> LRN -> pool: column-local."""
        x = self.pool(self.norm1(F.relu(self.conv1(x))))
        return self.pool(self.norm2(F.relu(self.conv2(x))))

    def block2(self, both: torch.Tensor) -> torch.Tensor:
        """conv3 (sees both columns) -> conv4 -> conv5 (own column) -> pool, flattened."""
        x = F.relu(self.conv3(both))
        x = F.relu(self.conv4(x))
        x = self.pool(F.relu(self.conv5(x)))
        return torch.flatten(x, 1)


def _init_weights(module: nn.Module, scheme: str) -> None:
    """paper (section 5): weights ~ N(0, 0.01); biases 1 in conv2, conv4, conv5, fc6, fc7,
    else 0. kaiming: N(0, 2/fan_in) for the ReLU layers, N(0, 0.01) for fc8, biases 0."""
    for name, layer in module.named_children():
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            continue
        assert layer.bias is not None  # every AlexNet layer has one
        if scheme == "paper":
            nn.init.normal_(layer.weight, mean=0.0, std=0.01)
            nn.init.constant_(layer.bias, 1.0 if name in ("conv2", "conv4", "conv5", "fc6", "fc7") else 0.0)
        else:
            if name == "fc8":
                nn.init.normal_(layer.weight, mean=0.0, std=0.01)
            else:
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)


class AlexNet(nn.Module):
    """The paper's network. `devices`: one device per column (cuda:0 and cuda:1 for the
    paper's layout; the same device twice, or "cpu", is the common case)."""

    def __init__(self, cfg: AlexNetConfig = AlexNetConfig(), devices: tuple[str | torch.device, ...] | None = None):
        super().__init__()
        self.cfg = cfg
        widths = cfg.widths()
        total = ColumnWidths(*(sum(getattr(w, f) for w in widths) for f in ColumnWidths.__dataclass_fields__))
        devices = devices or ("cpu",) * cfg.columns
        if len(devices) == 1:
            devices = tuple(devices) * cfg.columns
        if len(devices) != cfg.columns:
            raise ValueError(f"{cfg.columns} column(s) need {cfg.columns} device(s), got {devices}")
        self.devices = tuple(torch.device(d) for d in devices)
        self.columns = nn.ModuleList(Column(cfg, w, total, d) for w, d in zip(widths, self.devices))
        for column in self.columns:
            _init_weights(column, cfg.init)

    @property
    def output_device(self) -> torch.device:
        """Logits and embeddings are gathered on column A's device."""
        return self.devices[0]

    def _columns(self) -> Sequence[Column]:
        return cast("Sequence[Column]", self.columns)  # nn.ModuleList types its items as Module

    def _gather(self, parts: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        """Concatenate all columns' outputs on `device` (the only cross-column traffic)."""
        if len(parts) == 1:
            return parts[0]
        return torch.cat([p.to(device, non_blocking=True) for p in parts], dim=1)

    def _hidden(self, x: torch.Tensor) -> list[torch.Tensor]:
        """fc7 activations after ReLU, one tensor per column, on that column's device."""
        cols, devs = self._columns(), self.devices
        h = [c.block1(x.to(d, non_blocking=True)) for c, d in zip(cols, devs)]
        h = [c.block2(self._gather(h, d)) for c, d in zip(cols, devs)]
        h = [c.drop(F.relu(c.fc6(self._gather(h, d)))) for c, d in zip(cols, devs)]
        return [F.relu(c.fc7(self._gather(h, d))) for c, d in zip(cols, devs)]

    def _logits(self, hidden: list[torch.Tensor]) -> torch.Tensor:
        h = [c.drop(a) for c, a in zip(self._columns(), hidden)]
        logits = [c.fc8(self._gather(h, d)) for c, d in zip(self._columns(), self.devices)]
        return self._gather(logits, self.output_device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, S, S) -> logits (N, num_classes) on column A's device."""
        return self._logits(self._hidden(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The 4096-d fc7 activations (after ReLU, before dropout): the paper's image
        descriptor (6.1), compared by Euclidean distance."""
        return self._gather(self._hidden(x), self.output_device)

    def forward_with_embedding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, fc7 embedding) from one pass (serving answers both from one batch)."""
        hidden = self._hidden(x)
        return self._logits(hidden), self._gather(hidden, self.output_device)

    def column_parameters(self, column: int) -> list[nn.Parameter]:
        return list(self.columns[column].parameters())


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
