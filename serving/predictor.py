"""The model behind the service: loads a contract-2 checkpoint (weights only, never
unpickled) and turns image bytes into class probabilities and fc7 embeddings.

Preprocessing is the trainer's, step for step (contracts 1 and 3): `prepare_image` (the
sharder's function), the JPEG round trip at the shard set's quality (what DALI decoded in
training), then the eval crop and normalisation numbers of pipeline.transforms, which the
DALI val pipeline also uses.

The forward pass runs in PyTorch, or (settings.backend = "onnxruntime") in ONNX Runtime on the
network exported at load (serving.onnx_backend).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch

from pipeline.preprocess import DEFAULT_JPEG_QUALITY, ImageError, header_of, open_image
from pipeline.sharded import as_sharded
from pipeline.transforms import eval_crops
from serving.budget import decode_cost
from serving.inference import prepare
from serving.settings import MiB, Settings
from trainer.checkpoint import load_model

ACCEPTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP"})


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


class Predictor:
    """The model and the input policy of `settings` (limits from serving.settings, nowhere
    else; without settings, its defaults, read from no environment)."""

    def __init__(self, checkpoint: Path, settings: Settings | None = None, device: str | None = None):
        settings = settings if settings is not None else Settings.model_construct()
        self.path = Path(checkpoint).resolve()
        self.backend = settings.backend
        # onnxruntime runs on the CPU (serving.onnx_backend); torch where settings.device says.
        self.device = torch.device("cpu") if self.backend == "onnxruntime" else pick_device(device or settings.device)
        model, self.meta = load_model(checkpoint, device=self.device)
        self._onnx = None
        if self.backend == "onnxruntime":
            from serving.onnx_backend import OnnxRuntimeNet

            self._onnx = OnnxRuntimeNet(model, self.meta)
            self.model, self.inference = model, "onnxruntime"
        else:
            self.model, self.inference = prepare(model, settings.inference, self.device)
        self.classes = self.meta.classes
        self.norm = self.meta.normalization
        self.input_size = self.meta.input_size
        self.quality = self.meta.jpeg_quality or DEFAULT_JPEG_QUALITY
        self.max_pixels, self.max_side = settings.max_pixels, settings.max_side
        self.max_decode_bytes = settings.max_decode_bytes
        # What clients see: names, never server paths.
        self.identity = {
            "checkpoint": self.path.name,
            "epoch": self.meta.epoch,
            "run": self.meta.run,
            "num_classes": len(self.classes),
            "val_top1_error": self.meta.metrics.get("val_top1_error"),
        }
        self._lock = threading.Lock()  # one forward at a time; batching provides the parallelism

    @property
    def signature(self) -> tuple:
        """Everything preprocessing and the answer's labels depend on. A new checkpoint with
        the same signature can take over requests already preprocessed for this one."""
        return (
            self.input_size,
            self.quality,
            tuple(self.norm.mean),
            tuple(self.norm.std),
            tuple(c["wnid"] for c in self.classes),
        )

    def preprocess(self, data: bytes, ten_crop: bool = False) -> np.ndarray:
        """Bytes -> (1 or 10, 3, S, S) float32. Raises ImageError for unusable input."""
        header = header_of(
            open_image(data, max_pixels=self.max_pixels, allowed_formats=ACCEPTED_FORMATS, allow_animated=False)
        )
        if max(header.width, header.height) > self.max_side:
            raise ImageError(
                f"image is {header.width}x{header.height}: a side over {self.max_side} px", kind="too_large"
            )
        cost = decode_cost(header)
        if cost > self.max_decode_bytes:
            raise ImageError(
                f"decoding this {header.format} image ({header.width}x{header.height}, mode "
                f"{header.mode}) would need about {cost / MiB:,.0f} MiB; the limit per request is "
                f"{self.max_decode_bytes / MiB:,.0f} MiB",
                kind="over_budget",
            )
        pixels = as_sharded(
            data,
            quality=self.quality,
            max_pixels=self.max_pixels,
            allowed_formats=ACCEPTED_FORMATS,
            allow_animated=False,
        )
        return eval_crops(pixels, self.input_size, self.norm, ten_crop=ten_crop)

    @torch.no_grad()
    def forward(self, crops: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, S, S) -> (logits, fc7 embeddings), both (N, ...) on the CPU."""
        if self._onnx is not None:
            with self._lock:
                return self._onnx(crops)
        x = torch.from_numpy(crops).to(self.device)
        with self._lock:
            logits, hidden = self.model.forward_with_embedding(x)
        return logits.float().cpu(), hidden.float().cpu()

    def top_k(self, probs: torch.Tensor, k: int) -> list[dict]:
        values, indices = probs.topk(k)
        return [
            {
                "index": int(i),
                "wnid": self.classes[int(i)]["wnid"],
                "name": self.classes[int(i)]["name"],
                "probability": float(v),
            }
            for v, i in zip(values, indices)
        ]
