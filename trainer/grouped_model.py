"""The two-column AlexNet's twin: the same network as trainer.model.AlexNet written as ONE
module with grouped convolutions (the way torchvision-era code expresses the two columns).
Same FLOPs, same parameters, same function: `from_columns` copies a two-column model's
weights in, and the outputs agree. It is the oracle for tests/trainer/test_model.py and the
baseline for benchmarks/model_step.py; nothing in training or serving uses it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.lrn import paper_lrn
from trainer.model import AlexNet, AlexNetConfig


class GroupedAlexNet(nn.Module):
    def __init__(self, cfg: AlexNetConfig = AlexNetConfig()):
        super().__init__()
        assert cfg.columns == 2
        self.cfg = cfg
        fmap = cfg.feature_map_size()
        self.conv1 = nn.Conv2d(3, 96, 11, stride=4)
        self.conv2 = nn.Conv2d(96, 256, 5, padding=2, groups=2)
        self.conv3 = nn.Conv2d(256, 384, 3, padding=1)
        self.conv4 = nn.Conv2d(384, 384, 3, padding=1, groups=2)
        self.conv5 = nn.Conv2d(384, 256, 3, padding=1, groups=2)
        self.fc6 = nn.Linear(256 * fmap * fmap, 4096)
        self.fc7 = nn.Linear(4096, 4096)
        self.fc8 = nn.Linear(4096, cfg.num_classes)
        self.pool = nn.MaxPool2d(cfg.pool_kernel, cfg.pool_stride)
        self.drop = nn.Dropout(cfg.dropout)

    def _lrn(self, x: torch.Tensor) -> torch.Tensor:
        """The paper's LRN within each column's half of the maps (as the two GPUs did)."""
        if not self.cfg.lrn:
            return x
        n, c, h, w = x.shape
        c_ = self.cfg
        y = paper_lrn(x.reshape(n * 2, c // 2, h, w), c_.lrn_size, c_.lrn_alpha, c_.lrn_beta, c_.lrn_k)
        return y.reshape(n, c, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self._lrn(F.relu(self.conv1(x))))
        x = self.pool(self._lrn(F.relu(self.conv2(x))))
        x = F.relu(self.conv3(x))
        x = F.relu(self.conv4(x))
        x = torch.flatten(self.pool(F.relu(self.conv5(x))), 1)
        x = self.drop(F.relu(self.fc6(x)))
        x = self.drop(F.relu(self.fc7(x)))
        return self.fc8(x)

    @classmethod
    def from_columns(cls, model: AlexNet) -> GroupedAlexNet:
        """Copy a two-column AlexNet's weights: every layer is its columns' kernels stacked."""
        grouped = cls(model.cfg).to(model.output_device)
        a, b = model.columns
        with torch.no_grad():
            for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"):
                for p in ("weight", "bias"):
                    parts = [getattr(getattr(c, name), p).to(model.output_device) for c in (a, b)]
                    getattr(getattr(grouped, name), p).copy_(torch.cat(parts, 0))
        return grouped
