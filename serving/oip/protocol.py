"""The Open Inference Protocol (KServe v2) for this service's model: its metadata, and the one
inference path that HTTP (serving.oip.http) and gRPC (serving.oip.grpc_server) share.

The model is named settings.model_name ("alexnet"); its one version is the served checkpoint's
epoch, so a hot reload (serving.reload) changes it. A request for another name or version
gets "not found" (404 / NOT_FOUND).

Inputs, exactly one per request:
    image   BYTES [N] (or [N, 1])  encoded images (JPEG, PNG, WebP, BMP), one per element,
                                   preprocessed exactly as POST /predict does (centre crop)
    input   FP32  [N, 3, S, S]     images already preprocessed (S: the model's input size;
                                   trainer.export writes the recipe as preprocessing.json)
Outputs; without a list of outputs the three top-k ones, logits only when named:
    top_k_indices        INT64 [N, k]        class indices, most probable first
    top_k_wnids          BYTES [N, k]        their WordNet ids
    top_k_probabilities  FP32  [N, k]        their softmax probabilities
    logits               FP32  [N, classes]
Parameter: top_k (an integer request parameter, 1..min(classes, max_k); default 5).

A request's images are admitted like POST /predict's (serving.admission: a place in flight,
the batcher's room for its N images, or 503 / RESOURCE_EXHAUSTED at once), decoded in the
bounded decode pool, answered within the request deadline, and share the micro-batcher's
forward passes with every other request. At most settings.max_request_images images per
request.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline.preprocess import ImageError
from serving.admission import admitted, within_deadline
from serving.errors import ApiError
from serving.oip.tensors import BYTES, Tensor, invalid
from serving.predictor import Predictor

SERVER_NAME = "alexnet-2012"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["binary_tensor_data"]  # HTTP: Triton's binary tensor data extension
IMAGE, INPUT = "image", "input"
TOP_K_INDICES, TOP_K_WNIDS, TOP_K_PROBABILITIES, LOGITS = (
    "top_k_indices",
    "top_k_wnids",
    "top_k_probabilities",
    "logits",
)
OUTPUTS = (TOP_K_INDICES, TOP_K_WNIDS, TOP_K_PROBABILITIES, LOGITS)
DEFAULT_OUTPUTS = (TOP_K_INDICES, TOP_K_WNIDS, TOP_K_PROBABILITIES)
DEFAULT_K = 5


@dataclass
class InferRequest:
    model_name: str
    model_version: str  # "" = the current one
    inputs: list[Tensor]
    outputs: list[str] | None = None  # requested output names; None = DEFAULT_OUTPUTS
    parameters: dict[str, Any] = field(default_factory=dict)
    id: str = ""


@dataclass
class InferResponse:
    model_name: str
    model_version: str
    outputs: list[Tensor]
    id: str = ""


def version_of(predictor: Predictor) -> str:
    return str(predictor.meta.epoch)


def platform_of(predictor: Predictor) -> str:
    return "onnxruntime_onnx" if predictor.backend == "onnxruntime" else "pytorch"


def current(state: Any, name: str, version: str = "") -> Predictor:
    """The served model, if `name` (and `version`, when given) name it; else 404."""
    predictor: Predictor | None = getattr(state, "predictor", None)
    if name != state.settings.model_name:
        raise ApiError(
            404, "model_not_found", f"no model {name!r} here; this server serves {state.settings.model_name!r}"
        )
    if predictor is None:
        raise ApiError(503, "not_ready", "the model is not loaded yet")
    if version and version != version_of(predictor):
        raise ApiError(
            404,
            "version_not_found",
            f"model {name!r} has no version {version!r}; it serves version {version_of(predictor)!r} "
            "(the checkpoint's epoch)",
        )
    return predictor


def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS}


def model_metadata(state: Any, name: str, version: str = "") -> dict[str, Any]:
    predictor = current(state, name, version)
    s = predictor.input_size
    return {
        "name": name,
        "versions": [version_of(predictor)],
        "platform": platform_of(predictor),
        "inputs": [
            {"name": IMAGE, "datatype": BYTES, "shape": [-1]},
            {"name": INPUT, "datatype": "FP32", "shape": [-1, 3, s, s]},
        ],
        "outputs": [
            {"name": TOP_K_INDICES, "datatype": "INT64", "shape": [-1, -1]},
            {"name": TOP_K_WNIDS, "datatype": BYTES, "shape": [-1, -1]},
            {"name": TOP_K_PROBABILITIES, "datatype": "FP32", "shape": [-1, -1]},
            {"name": LOGITS, "datatype": "FP32", "shape": [-1, len(predictor.classes)]},
        ],
    }


@dataclass
class _Plan:
    """A request, checked: what to run and what to answer."""

    images: list[bytes] | None  # encoded images, or
    crops: np.ndarray | None  # preprocessed ones
    count: int
    k: int
    outputs: list[str]


def _plan(request: InferRequest, predictor: Predictor, max_images: int, max_k: int) -> _Plan:
    if len(request.inputs) != 1:
        raise invalid(f"send exactly one input, {IMAGE!r} (BYTES) or {INPUT!r} (FP32); got {len(request.inputs)}")
    (tensor,) = request.inputs
    images: list[bytes] | None = None
    crops: np.ndarray | None = None
    if tensor.name == IMAGE:
        if tensor.datatype != BYTES or len(tensor.shape) not in (1, 2) or tensor.shape[1:] not in ([], [1]):
            raise invalid(f"input {IMAGE!r} is BYTES of shape [N] or [N, 1]: one encoded image per element")
        assert isinstance(tensor.data, list)
        images, count = tensor.data, len(tensor.data)
    elif tensor.name == INPUT:
        s = predictor.input_size
        if tensor.datatype != "FP32" or len(tensor.shape) != 4 or tensor.shape[1:] != [3, s, s]:
            raise invalid(f"input {INPUT!r} is FP32 of shape [N, 3, {s}, {s}]: preprocessed images")
        crops = np.array(tensor.data, dtype=np.float32)  # a writable copy, the batcher's to keep
        if not np.isfinite(crops).all():
            raise invalid(f"input {INPUT!r} holds NaN or infinite values")
        count = len(crops)
    else:
        raise invalid(f"no input {tensor.name!r}: send {IMAGE!r} (BYTES, encoded images) or {INPUT!r} (FP32)")
    if not 1 <= count <= max_images:
        raise invalid(f"{count} images in one request; send 1 to {max_images}")
    most = min(len(predictor.classes), max_k)
    k = request.parameters.get("top_k", DEFAULT_K)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= most:
        raise invalid(f"parameter top_k must be an integer from 1 to {most}")
    outputs = list(DEFAULT_OUTPUTS) if not request.outputs else request.outputs
    unknown = [o for o in outputs if o not in OUTPUTS]
    if unknown:
        raise invalid(f"no output {unknown[0]!r}; the outputs are {', '.join(OUTPUTS)}")
    return _Plan(images, crops, count, k, outputs)


async def infer(state: Any, request: InferRequest) -> InferResponse:
    """Check, admit, run and answer one inference request (ApiError for every refusal)."""
    settings = state.settings
    predictor = current(state, request.model_name, request.model_version)
    plan = _plan(request, predictor, settings.max_request_images, settings.max_k)
    with admitted(state.admission, state.batcher, plan.count):
        logits = await within_deadline(_run(state, predictor, plan), settings, state.metrics)
    return InferResponse(request.model_name, version_of(predictor), _outputs(predictor, logits, plan), request.id)


async def _run(state: Any, predictor: Predictor, plan: _Plan):
    crops = plan.crops
    if plan.images is not None:
        decoded = await asyncio.gather(
            *(_decode(state, predictor, i, data) for i, data in enumerate(plan.images)), return_exceptions=True
        )
        for result in decoded:
            if isinstance(result, BaseException):
                raise result
        crops = np.concatenate(decoded)  # type: ignore[arg-type]  # no exceptions left
    assert crops is not None
    logits, _ = await state.batcher.submit(crops)
    return logits


async def _decode(state: Any, predictor: Predictor, index: int, data: bytes) -> np.ndarray:
    try:
        return await state.decoder.run(predictor.preprocess, data)
    except ImageError as exc:
        error = ApiError.from_image_error(exc)
        error.detail = f"{IMAGE}[{index}]: {error.detail}"
        raise error from None


def _outputs(predictor: Predictor, logits: torch.Tensor, plan: _Plan) -> list[Tensor]:
    """The requested outputs; probabilities and their order as POST /predict computes them."""
    probs = logits.float().softmax(dim=1)
    values, indices = probs.topk(plan.k, dim=1)
    n, k = indices.shape
    wnids = [predictor.classes[int(i)]["wnid"].encode("ascii") for i in indices.reshape(-1)]
    made = {
        TOP_K_INDICES: lambda: Tensor(TOP_K_INDICES, "INT64", [n, k], indices.numpy().astype(np.int64)),
        TOP_K_WNIDS: lambda: Tensor(TOP_K_WNIDS, BYTES, [n, k], wnids),
        TOP_K_PROBABILITIES: lambda: Tensor(TOP_K_PROBABILITIES, "FP32", [n, k], values.numpy()),
        LOGITS: lambda: Tensor(LOGITS, "FP32", list(logits.shape), logits.float().numpy()),
    }
    return [made[name]() for name in plan.outputs]
