"""The endpoints.

    POST /predict   image (multipart field "file", or a raw image/* body) -> top-k
                    ?k=5 (1..min(num_classes, max_k)), ?crops=1|10 (the paper's 10-crop)
    POST /embed     image -> the 4096-d fc7 vector (paper 6.1)
    POST /similar   image -> the nearest indexed images by Euclidean fc7 distance (?k=6)
    POST /index     ?path=...: build the retrieval index in the background (202; only under
                    settings.index_roots; 409 while a build runs);  GET /index: its state
    GET  /health    alive;  GET /ready: model loaded (and the index state);  GET /metrics
    GET  /          a small page: a token field, pick or drop an image, see the top-5 as bars

`inputs` (the first four) carry the auth dependency; `public` does not. An image request
reads its body first (serving.upload: its deadline, the body memory), is admitted only then
(serving.admission: in flight, the batcher's room), and runs within its deadline: decode in
the bounded pool (serving.admission.DecodePool), then the micro-batcher's bounded queue.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pipeline.preprocess import ImageError
from serving.admission import admitted, refuse_now, within_deadline
from serving.auth import require_token
from serving.errors import ApiError, error_response
from serving.predictor import Predictor
from serving.upload import read_image

STATIC = Path(__file__).parent / "static"

inputs = APIRouter(dependencies=[Depends(require_token)])
public = APIRouter()


async def _infer(request: Request, ten_crop: bool):
    """Body -> crops -> (predictor, logits, embeddings, timing). The body is read first
    (within its deadline and the body memory), and only then is the request admitted: a
    place in flight and the batcher's room, or 503; from there it runs within its deadline.
    A server that is full right now refuses before reading the body."""
    state = request.app.state
    settings = state.settings
    images = 10 if ten_crop else 1
    refuse_now(state.admission, state.batcher, images, request.headers)
    with state.bodies.share() as share:
        data = await read_image(request, settings, share, state.metrics)
        with admitted(state.admission, state.batcher, images):
            return await within_deadline(_run(state, data, ten_crop), settings, state.metrics)


async def _run(state, data: bytearray, ten_crop: bool):
    predictor: Predictor = state.predictor
    t0 = time.perf_counter()
    try:
        crops = await state.decoder.run(predictor.preprocess, data, ten_crop)
    except ImageError as exc:
        raise ApiError.from_image_error(exc) from None
    t1 = time.perf_counter()
    logits, embeddings = await state.batcher.submit(crops)
    t2 = time.perf_counter()
    timing = {"preprocess_ms": round((t1 - t0) * 1e3, 2), "inference_ms": round((t2 - t1) * 1e3, 2)}
    return predictor, logits, embeddings, timing


@inputs.post("/predict", summary="Top-k classes for an image")
async def predict(request: Request, k: int = 5, crops: int = 1):
    predictor: Predictor = request.app.state.predictor
    max_k = min(len(predictor.classes), request.app.state.settings.max_k)
    if not 1 <= k <= max_k:
        raise ApiError(400, "invalid_k", f"k must be between 1 and {max_k}")
    if crops not in (1, 10):
        raise ApiError(400, "invalid_crops", "crops must be 1 (centre) or 10 (the paper's 10-crop average)")
    predictor, logits, _, timing = await _infer(request, ten_crop=crops == 10)
    probs = logits.softmax(dim=1).mean(dim=0)
    return {
        "predictions": predictor.top_k(probs, k),
        "crops": crops,
        "checkpoint": predictor.identity,
        "timing": timing,
    }


@inputs.post("/embed", summary="The 4096-d fc7 embedding of an image (paper 6.1)")
async def embed(request: Request):
    predictor, _, embeddings, timing = await _infer(request, ten_crop=False)
    return {
        "embedding": [round(float(v), 6) for v in embeddings[0]],
        "dim": int(embeddings.shape[1]),
        "checkpoint": predictor.identity,
        "timing": timing,
    }


@inputs.post("/similar", summary="Nearest indexed images by fc7 distance (paper 6.1)")
async def similar(request: Request, k: int = 6):
    indexer = request.app.state.indexer
    index = indexer.index
    if index is None:
        raise ApiError(
            409,
            "no_index",
            f"no retrieval index (state: {indexer.state}): start with "
            "ALEXNET_INDEX=<folder or shard set>, or POST /index?path=...",
        )
    max_k = min(len(index.keys), request.app.state.settings.max_k)
    if not 1 <= k <= max_k:
        raise ApiError(400, "invalid_k", f"k must be between 1 and {max_k}")
    predictor, _, embeddings, timing = await _infer(request, ten_crop=False)
    if not (predictor is request.app.state.predictor is indexer.index_model) or index is not indexer.index:
        # The model changed while this request ran: its embedding and the index's are not comparable.
        raise ApiError(
            409,
            "index_rebuilding",
            "the model changed and the index is being re-embedded; retry when GET /index says ready",
        )
    return {
        "neighbours": index.nearest(embeddings[0], k),
        "index": {"source": index.source, "size": len(index.keys)},
        "checkpoint": predictor.identity,
        "timing": timing,
    }


@inputs.post("/index", status_code=202, summary="Build the retrieval index from a folder or shard set on the server")
async def make_index(request: Request, path: str, split: str = "val"):
    settings = request.app.state.settings
    roots = [Path(r) for r in settings.index_roots.split(os.pathsep) if r]
    return request.app.state.indexer.start(path, split, roots)


@inputs.get("/index", summary="The retrieval index: state, size, last error")
async def index_state(request: Request):
    return request.app.state.indexer.status()


@public.get("/health", summary="The process is up")
async def health():
    return {"status": "ok"}


@public.get("/ready", summary="The model is loaded and serving")
async def ready(request: Request):
    predictor = getattr(request.app.state, "predictor", None)
    if predictor is None:
        return error_response(503, "not_ready", "the model is not loaded yet")
    index = request.app.state.indexer.status()
    return {
        "ready": True,
        "checkpoint": predictor.identity,
        "device": predictor.device.type,
        "inference": predictor.inference,
        "backend": predictor.backend,
        "auth": request.app.state.settings.auth,
        "index": {k: v for k, v in index.items() if k in ("state", "size")},
    }


@public.get("/metrics", summary="Prometheus metrics")
async def prometheus(request: Request):
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@public.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page():
    return HTMLResponse((STATIC / "index.html").read_text("utf-8"))
