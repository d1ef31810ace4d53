"""The FastAPI app: `create_app(settings)`; the model is loaded in the lifespan.

    POST /predict   image (multipart field "file", or a raw image/* body) -> top-k
                    ?k=5 (1..min(num_classes, max_k)), ?crops=1|10 (the paper's 10-crop)
    POST /embed     image -> the 4096-d fc7 vector (paper 6.1)
    POST /similar   image -> the nearest indexed images by Euclidean fc7 distance (?k=6)
    POST /index     ?path=...: (re)build the retrieval index (only under settings.index_roots)
    GET  /health    alive;  GET /ready: model loaded;  GET /metrics: Prometheus
    With settings.watch_s and a run folder, a newer checkpoint is picked up without a restart.
    GET  /          a small page: pick or drop an image, see the top-5 as bars

Every client error is a 4xx JSON body {"error": ..., "detail": ...}; the server stays up.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.preprocess import ImageError
from serving.batcher import MicroBatcher
from serving.predictor import Predictor
from serving.settings import Settings

STATIC = Path(__file__).parent / "static"
RAW_TYPES = ("image/", "application/octet-stream")
log = logging.getLogger("serving")


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: str):
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


def _error(status: int, error: str, detail) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("alexnet_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("alexnet_request_latency_seconds", "Request latency", ["endpoint"],
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                                 registry=self.registry)
        self.batch_size = Histogram("alexnet_batch_size", "Images per forward pass",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        self.reloads = Counter("alexnet_checkpoint_reloads", "Switches to a newer checkpoint of the run",
                               registry=self.registry)


async def build_index_async(app: FastAPI, path: Path, split: str):
    from serving.retrieval import build_index

    predictor = app.state.predictor
    index = await asyncio.to_thread(build_index, path, predictor, split)
    if app.state.predictor is predictor:  # else the model changed meanwhile: a newer build is on its way
        app.state.index = index
    return index


async def watch_checkpoints(app: FastAPI, settings: Settings) -> None:
    """Switch to the run folder's newest checkpoint whenever one appears (training goes on
    beside serving). A checkpoint that fails to load or changes preprocessing is skipped
    with a warning; the one being served stays."""
    from trainer.checkpoint import latest_checkpoint

    failed: set[Path] = set()
    while True:
        await asyncio.sleep(settings.watch_s)
        newest = await asyncio.to_thread(latest_checkpoint, settings.run_dir)
        current = Path(app.state.predictor.identity["checkpoint"])
        if newest is None or newest.resolve() == current or newest in failed:
            continue
        try:
            predictor = await asyncio.to_thread(Predictor, newest, settings.device, settings.max_pixels,
                                                settings.max_side)
        except Exception as exc:  # e.g. deleted by num_to_keep while loading: try the next one
            log.warning("not switching to %s: %s", newest, exc)
            failed.add(newest)
            continue
        if predictor.signature != app.state.predictor.signature:
            log.warning("not switching to %s: its classes or preprocessing differ from %s", newest, current)
            failed.add(newest)
            continue
        # One assignment, no await in between: each request sees the old model or the new one.
        app.state.predictor = predictor
        app.state.metrics.reloads.inc()
        log.info("now serving %s (epoch %s)", newest, predictor.identity["epoch"])
        index = app.state.index
        if index is not None:  # fc7 distances only mean something within one model: re-embed
            app.state.index = None
            app.state.indexing = asyncio.create_task(build_index_async(app, Path(index.source), index.split))


def create_app(settings: Settings) -> FastAPI:
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Loading fails loudly (missing, incomplete or mismatched checkpoint): no half-up server.
        app.state.predictor = await asyncio.to_thread(Predictor, settings.checkpoint, settings.device,
                                                      settings.max_pixels, settings.max_side)
        # The batcher runs whichever model is current when a batch goes out (see watch_checkpoints).
        batcher = MicroBatcher(lambda crops: app.state.predictor.forward(crops), settings.max_batch,
                               settings.max_wait_ms, settings.batching, on_batch=metrics.batch_size.observe)
        await batcher.start()
        app.state.batcher = batcher
        app.state.index = None
        app.state.indexing = None
        if settings.index is not None:  # in the background: /ready does not wait for it
            app.state.indexing = asyncio.create_task(build_index_async(app, settings.index, settings.index_split))
        watcher = None
        if settings.watch_s > 0 and settings.run_dir is not None:
            watcher = asyncio.create_task(watch_checkpoints(app, settings))
        yield
        for task in (watcher, app.state.indexing):
            if task is not None:
                task.cancel()
        await batcher.stop()

    app = FastAPI(title="AlexNet (Krizhevsky et al. 2012)", version="0.1.0", lifespan=lifespan,
                  description="Top-k ImageNet predictions and fc7 embeddings from a trained checkpoint.")
    app.state.settings, app.state.metrics = settings, metrics

    @app.middleware("http")
    async def count(request: Request, call_next):
        t0 = time.perf_counter()
        endpoint = request.url.path if request.url.path in KNOWN else "other"
        try:
            response = await call_next(request)
        except Exception:
            metrics.requests.labels(endpoint, "500").inc()
            raise
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
        return response

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return _error(exc.status, exc.error, exc.detail)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return _error(422, "invalid_request", detail)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, "http_error", str(exc.detail))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        return _error(500, "internal_error", "the server failed on this request; it is still up")

    def check_auth(request: Request) -> None:
        if settings.token is None:
            return
        if request.headers.get("authorization", "") != f"Bearer {settings.token}":
            raise ApiError(401, "unauthorized", "missing or wrong bearer token (Authorization: Bearer <token>)")

    async def read_image(request: Request) -> bytes:
        limit = settings.max_upload_bytes
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit + 64 * 1024:  # multipart framing allowance
            raise ApiError(413, "payload_too_large", f"upload of {int(length):,} bytes; the limit is {limit:,}")
        ctype = request.headers.get("content-type", "").lower()
        if ctype.startswith("multipart/form-data"):
            form = await request.form(max_files=1, max_fields=8, max_part_size=limit + 1)
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise ApiError(400, "missing_file", 'multipart upload needs a file in the field "file"')
            data = await upload.read(limit + 1)
        elif ctype.startswith(RAW_TYPES):
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, "payload_too_large", f"body over the limit of {limit:,} bytes")
                chunks.append(chunk)
            data = b"".join(chunks)
        else:
            raise ApiError(415, "unsupported_media_type",
                           f"send an image as multipart/form-data (field 'file') or as a raw image/* body, "
                           f"not {ctype or 'no content type'}")
        if len(data) > limit:
            raise ApiError(413, "payload_too_large", f"upload over the limit of {limit:,} bytes")
        if not data:
            raise ApiError(400, "empty_body", "the request carried no image bytes")
        return data

    async def run(request: Request, ten_crop: bool):
        check_auth(request)
        predictor: Predictor = request.app.state.predictor
        data = await read_image(request)
        t0 = time.perf_counter()
        try:
            crops = await asyncio.to_thread(predictor.preprocess, data, ten_crop)
        except ImageError as exc:
            status = 413 if exc.kind == "too_large" else (415 if exc.kind == "unsupported_format" else 400)
            raise ApiError(status, exc.kind, exc.reason) from None
        t1 = time.perf_counter()
        logits, embeddings = await request.app.state.batcher.submit(crops)
        t2 = time.perf_counter()
        timing = {"preprocess_ms": round((t1 - t0) * 1e3, 2), "inference_ms": round((t2 - t1) * 1e3, 2)}
        return predictor, logits, embeddings, timing

    @app.post("/predict", summary="Top-k classes for an image")
    async def predict(request: Request, k: int = 5, crops: int = 1):
        predictor: Predictor = request.app.state.predictor
        max_k = min(len(predictor.classes), settings.max_k)
        if not 1 <= k <= max_k:
            raise ApiError(400, "invalid_k", f"k must be between 1 and {max_k}")
        if crops not in (1, 10):
            raise ApiError(400, "invalid_crops", "crops must be 1 (centre) or 10 (the paper's 10-crop average)")
        predictor, logits, _, timing = await run(request, ten_crop=crops == 10)
        probs = logits.softmax(dim=1).mean(dim=0)
        return {"predictions": predictor.top_k(probs, k), "crops": crops, "checkpoint": predictor.identity,
                "timing": timing}

    @app.post("/embed", summary="The 4096-d fc7 embedding of an image (paper 6.1)")
    async def embed(request: Request):
        predictor, _, embeddings, timing = await run(request, ten_crop=False)
        return {"embedding": [round(float(v), 6) for v in embeddings[0]], "dim": int(embeddings.shape[1]),
                "checkpoint": predictor.identity, "timing": timing}

    @app.post("/similar", summary="Nearest indexed images by fc7 distance (paper 6.1)")
    async def similar(request: Request, k: int = 6):
        index = request.app.state.index
        if index is None:
            raise ApiError(409, "no_index", "no retrieval index yet: start with ALEXNET_INDEX=<folder or shard set>, "
                                            "or POST /index?path=...")
        if not 1 <= k <= min(len(index.keys), settings.max_k):
            raise ApiError(400, "invalid_k", f"k must be between 1 and {min(len(index.keys), settings.max_k)}")
        predictor, _, embeddings, timing = await run(request, ten_crop=False)
        return {"neighbours": index.nearest(embeddings[0], k), "index": {"source": index.source,
                                                                          "size": len(index.keys)},
                "checkpoint": predictor.identity, "timing": timing}

    @app.post("/index", summary="Build the retrieval index from a folder or shard set on the server")
    async def make_index(request: Request, path: str, split: str = "val"):
        check_auth(request)
        roots = [Path(r).resolve() for r in settings.index_roots.split(os.pathsep) if r]
        target = Path(path).resolve()
        if not any(target == r or r in target.parents for r in roots):
            raise ApiError(403, "forbidden_path", "indexing on request is limited to settings.index_roots "
                                                  f"({settings.index_roots or 'none configured'})")
        try:
            index = await build_index_async(request.app, target, split)
        except (FileNotFoundError, ValueError, KeyError) as exc:
            raise ApiError(400, "cannot_index", str(exc)) from None
        return {"indexed": len(index.keys), "source": index.source}

    @app.get("/health", summary="The process is up")
    async def health():
        return {"status": "ok"}

    @app.get("/ready", summary="The model is loaded and serving")
    async def ready(request: Request):
        predictor = getattr(request.app.state, "predictor", None)
        if predictor is None:
            return _error(503, "not_ready", "the model is not loaded yet")
        return {"ready": True, "checkpoint": predictor.identity, "device": str(predictor.device)}

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse((STATIC / "index.html").read_text("utf-8"))

    KNOWN = {"/predict", "/embed", "/similar", "/index", "/health", "/ready", "/metrics", "/"}
    return app
