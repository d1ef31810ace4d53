"""`python -m trainer.export CHECKPOINT --out DIR`: the trained network as ONNX, laid out as a
Triton Inference Server model repository.

    DIR/alexnet/config.pbtxt          Triton's model configuration: the ONNX Runtime backend,
                                      dynamic batching, the tensors below
    DIR/alexnet/1/model.onnx          the network: "input" FP32 [N, 3, S, S] ->
                                      "logits" FP32 [N, classes] and "fc7" FP32 [N, 4096]
    DIR/alexnet/labels.txt            one wnid per class, in index order (the logits' labels)
    DIR/alexnet/preprocessing.json    what turns an image into "input" (contract 3's numbers)

CHECKPOINT is a checkpoint folder or a run folder (its newest registered checkpoint). The
network is exported as it is, both columns and the cross-column connections where the paper
has them, with the paper's LRN, by torch.onnx's dynamo exporter, with a dynamic batch
dimension. Before anything is written the export is checked: ONNX Runtime runs the ONNX
model on a batch of preprocessed images (seeded random pictures through the serving
preprocessing, or --images) and its logits are compared with PyTorch's; the largest
|difference| is printed, and over --tolerance the export fails (exit status 1) and writes
nothing. The model folder is assembled beside DIR/NAME and renamed into place: a reader never
sees half an export (a full disk: one line and exit status 4, the old export kept). serving's
ONNX Runtime back-end (ALEXNET_BACKEND=onnxruntime) exports the checkpoint it loads with the
same functions.

Needs the `onnx` extra: `pip install '.[onnx]'` (onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.atomic import exits_cleanly_when_full, write_atomic
from pipeline.cli import setup_logging
from pipeline.preprocess import DEFAULT_JPEG_QUALITY, OUTPUT_SIZE
from pipeline.sharded import as_sharded
from pipeline.transforms import eval_crops
from trainer.checkpoint import CheckpointError, CheckpointMeta, load_model, resolve
from trainer.model import AlexNet

log = logging.getLogger("trainer.export")

INPUT, LOGITS, FC7 = "input", "logits", "fc7"  # the ONNX model's tensor names
MODEL_FILE, CONFIG_FILE, LABELS_FILE, PREPROCESSING_FILE = (
    "model.onnx",
    "config.pbtxt",
    "labels.txt",
    "preprocessing.json",
)
# ONNX Runtime and PyTorch sum in different orders: float32 rounding, ~1e-4 on logits of tens
# (measured: 6e-5 on a 1000-class AlexNet's logits of up to 56). An export that differs by
# more than this computes something else.
TOLERANCE = 1e-3
PARITY_IMAGES = 8
MAX_BATCH = 128  # config.pbtxt's max_batch_size: what Triton's dynamic batcher may assemble
QUEUE_DELAY_US = 5000  # ... waiting at most this long for a batch (serving's max_wait_ms default)


class ExportError(RuntimeError):
    """The export cannot be made or fails its check."""


class MissingDependency(ExportError):
    """The `onnx` extra is not installed."""


class _WithEmbedding(torch.nn.Module):
    """The network with both of serving's outputs: logits and the fc7 embedding (paper 6.1)."""

    def __init__(self, net: AlexNet):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net.forward_with_embedding(x)


def _need_onnx() -> None:
    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if not _importable(m)]
    if missing:
        raise MissingDependency(f"{', '.join(missing)} not installed: pip install '.[onnx]' (or alexnet-2012[onnx])")


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def to_onnx(model: AlexNet) -> bytes:
    """The network as a serialized ONNX model: "input" [N, 3, S, S] -> "logits", "fc7", N dynamic."""
    _need_onnx()
    cpu = model
    if any(d.type != "cpu" for d in model.devices):  # the export traces on the CPU: a copy there
        cpu = AlexNet(model.cfg).eval()
        cpu.load_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})
    size = model.cfg.input_size
    example = torch.zeros(2, 3, size, size)
    batch = torch.export.Dim("batch", min=1, max=65536)
    with _quiet_exporter():
        program = torch.onnx.export(
            _WithEmbedding(cpu).eval(),
            (example,),
            dynamo=True,
            input_names=[INPUT],
            output_names=[LOGITS, FC7],
            dynamic_shapes={"x": {0: batch}},
            verbose=False,
        )
    assert program is not None  # dynamo=True always returns the program
    return program.model_proto.SerializeToString()


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter's and its optimizer's chatter (hundreds of INFO lines per export, warnings
    about optional packages) off the console; errors still show."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def ort_session(onnx_model: bytes, threads: int | None = None):
    """An ONNX Runtime CPU session over a serialized model."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(onnx_model, sess_options=options, providers=["CPUExecutionProvider"])


def parity_inputs(meta: CheckpointMeta, images: list[bytes] | None = None, count: int = PARITY_IMAGES) -> np.ndarray:
    """(N, 3, S, S) float32 as serving preprocesses them: `images` (encoded), else `count`
    seeded random pictures (any content: the check is of the arithmetic, on inputs of the
    scale the model sees)."""
    quality = meta.jpeg_quality or DEFAULT_JPEG_QUALITY
    if images:
        pixels = [as_sharded(data, quality=quality) for data in images]
    else:
        rng = np.random.default_rng(0)
        pixels = [rng.integers(0, 256, (OUTPUT_SIZE, OUTPUT_SIZE, 3), dtype=np.uint8) for _ in range(count)]
    return np.concatenate([eval_crops(p, meta.input_size, meta.normalization) for p in pixels])


@torch.no_grad()
def max_logit_difference(model: AlexNet, session, crops: np.ndarray) -> float:
    """max |logits(ONNX Runtime) - logits(PyTorch)| over `crops`."""
    (ours,) = session.run([LOGITS], {INPUT: crops})
    reference = model(torch.from_numpy(crops).to(model.devices[0])).float().cpu().numpy()
    return float(np.abs(ours - reference).max())


def preprocessing(meta: CheckpointMeta) -> dict[str, Any]:
    """What a client does to an image to make the model's "input" (contract 3), as data."""
    norm = meta.normalization
    return {
        "input": INPUT,
        "layout": "NCHW",
        "datatype": "FP32",
        "channels": "RGB",
        "resize_shorter_side": OUTPUT_SIZE,
        "center_crop": OUTPUT_SIZE,
        "jpeg_quality": meta.jpeg_quality or DEFAULT_JPEG_QUALITY,
        "input_size": meta.input_size,
        "crop": "center",
        "pixel_range": [0, 255],
        "mean": list(norm.mean),
        "std": list(norm.std),
        "formula": "(pixel - mean) / std, per channel",
        "notes": "EXIF orientation applied; the 256x256 image is JPEG round-tripped at jpeg_quality "
        "(what training decoded); the centre input_size crop is taken (pipeline.preprocess, "
        "pipeline.transforms.eval_crops)",
    }


def config_pbtxt(name: str, meta: CheckpointMeta, max_batch: int = MAX_BATCH) -> str:
    """Triton's model configuration (protobuf text format, its model_config.proto)."""
    s = meta.input_size
    embedding = sum(w.fc7 for w in meta.architecture.widths())
    return f"""name: "{name}"
backend: "onnxruntime"
max_batch_size: {max_batch}
input [
  {{
    name: "{INPUT}"
    data_type: TYPE_FP32
    dims: [ 3, {s}, {s} ]
  }}
]
output [
  {{
    name: "{LOGITS}"
    data_type: TYPE_FP32
    dims: [ {len(meta.classes)} ]
    label_filename: "{LABELS_FILE}"
  }},
  {{
    name: "{FC7}"
    data_type: TYPE_FP32
    dims: [ {embedding} ]
  }}
]
dynamic_batching {{
  max_queue_delay_microseconds: {QUEUE_DELAY_US}
}}
"""


def export(
    checkpoint: Path,
    out: Path,
    *,
    name: str = "alexnet",
    version: int = 1,
    tolerance: float = TOLERANCE,
    images: list[bytes] | None = None,
) -> tuple[Path, float]:
    """Write OUT/NAME (Triton's layout); -> (the model folder, max |logit difference|).
    Raises ExportError when the ONNX model's logits differ from PyTorch's by more than
    `tolerance` (nothing is written then)."""
    _need_onnx()
    found = resolve(checkpoint).checkpoint
    model, meta = load_model(found)
    size = meta.input_size
    log.info(
        "exporting %s (epoch %d, %d classes, %dx%d input) to ONNX", found, meta.epoch, len(meta.classes), size, size
    )
    onnx_model = to_onnx(model)
    crops = parity_inputs(meta, images)
    diff = max_logit_difference(model, ort_session(onnx_model), crops)
    log.info(
        "parity: max |logit difference| ONNX Runtime vs PyTorch = %.3g over %d %s (tolerance %g)",
        diff,
        len(crops),
        "images" if images else "random pictures",
        tolerance,
    )
    if not diff <= tolerance:  # NaN fails too
        raise ExportError(
            f"the ONNX model's logits differ from PyTorch's by {diff:.3g}, over the tolerance {tolerance:g}"
        )
    final = out / name
    staging = out / f".{name}.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        (staging / str(version)).mkdir(parents=True)
        (staging / str(version) / MODEL_FILE).write_bytes(onnx_model)
        (staging / LABELS_FILE).write_text("".join(f"{w}\n" for w in meta.wnids))
        (staging / PREPROCESSING_FILE).write_text(json.dumps(preprocessing(meta), indent=2) + "\n")
        write_atomic(staging / CONFIG_FILE, config_pbtxt(name, meta))
        _swap_in(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final, diff


def _swap_in(staging: Path, final: Path) -> None:
    """Replace `final` (a folder, if there is one) by `staging` with renames only."""
    old = final.with_name(f".{final.name}.{os.getpid()}.old")
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument("--out", type=Path, required=True, help="the model repository (DIR/NAME/... is written)")
    p.add_argument("--name", default="alexnet", help="the model's name in the repository (default: alexnet)")
    p.add_argument("--version", type=int, default=1, help="the model version folder (default: 1)")
    p.add_argument(
        "--tolerance",
        type=float,
        default=TOLERANCE,
        help=f"largest |logit difference| ONNX Runtime vs PyTorch allowed (default: {TOLERANCE:g})",
    )
    p.add_argument("--images", type=Path, help="a folder of images to check parity on (default: random pictures)")
    a = p.parse_args(argv)
    if a.version < 1:
        p.error("--version must be 1 or more (Triton's version folders)")
    return a


@exits_cleanly_when_full(log)
def main(argv: list[str] | None = None) -> int:
    setup_logging()
    a = parse_args(argv)
    images = None
    if a.images is not None:
        files = sorted(f for f in a.images.iterdir() if f.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp", ".bmp"))
        if not files:
            log.error("no images (.jpg, .jpeg, .png, .webp, .bmp) in %s", a.images)
            return 2
        images = [f.read_bytes() for f in files]
    try:
        folder, diff = export(a.checkpoint, a.out, name=a.name, version=a.version, tolerance=a.tolerance, images=images)
    except (CheckpointError, MissingDependency) as exc:
        log.error("cannot export: %s", exc)
        return 2
    except ExportError as exc:
        log.error("export failed: %s", exc)
        return 1
    log.info("wrote %s (Triton model repository %s; max |logit difference| %.3g)", folder, a.out, diff)
    print(json.dumps({"model": str(folder), "max_abs_logit_difference": diff}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
