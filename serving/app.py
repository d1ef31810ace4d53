"""The FastAPI app: `create_app(settings)`; the model is loaded in the lifespan.

Assembly only; each job has its module: routes (the endpoints), auth (the bearer-token
dependency), upload (the body within its limit, deadline and memory), admission (in-flight
bound, deadline, decode pool), batcher (micro-batching with a bounded queue), metrics
(Prometheus), indexing (the /similar index off the request path), reload (following a run
folder), errors (the JSON error bodies), edge (connections: per-address bound, header
deadline; `app.state.connections.protocol()` is uvicorn's `http=`), settings (every default
and limit), oip (the Open Inference Protocol: its /v2 routes on this app, and its gRPC server,
started here in the app's event loop when settings.grpc is on).

Middleware: CountRequests (every answer counted, 503s included).
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from fastapi import FastAPI

from serving import errors, routes
from serving.admission import Admission, DecodePool
from serving.batcher import MicroBatcher
from serving.edge import ConnectionGuard
from serving.indexing import Indexer
from serving.metrics import CountRequests, Metrics
from serving.oip import http as oip_http
from serving.predictor import Predictor
from serving.reload import watch_checkpoints
from serving.settings import Settings
from serving.turns import Turns, takes_turns
from serving.upload import BodyMemory


def create_app(settings: Settings) -> FastAPI:
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Loading fails loudly (missing, incomplete or mismatched checkpoint): no half-up server.
        app.state.predictor = await asyncio.to_thread(Predictor, settings.checkpoint, settings)
        # The batcher runs whichever model is current when a batch goes out (see serving.reload).
        turns = Turns(takes_turns(settings, app.state.predictor.device))

        def forward(crops):
            with turns.forward():
                return app.state.predictor.forward(crops)

        batcher = MicroBatcher(
            forward,
            max_batch=settings.max_batch,
            max_wait_ms=settings.max_wait_ms,
            max_queue_images=settings.max_queue_images,
            enabled=settings.batching,
            incoming=(lambda: turns.pending) if turns.enabled else None,
            max_gather_ms=settings.max_gather_ms,
            on_batch=metrics.batch_size.observe,
            on_queue=metrics.queued.set,
            on_drop=metrics.dropped.inc,
        )
        await batcher.start()
        app.state.batcher = batcher
        app.state.decoder = DecodePool(settings.max_decodes, turns)
        app.state.indexer = Indexer(lambda: app.state.predictor, settings.max_batch, settings.max_index_images)
        if settings.index is not None:  # in the background: /ready does not wait for it
            app.state.indexer.start_configured(settings.index, settings.index_split)
        watcher = None
        if settings.watch_s > 0 and settings.run_dir is not None:
            watcher = asyncio.create_task(watch_checkpoints(app, settings))
        grpc_server = None
        if settings.grpc:  # imported only here: its stubs register the `inference` protobuf types
            from serving.oip.grpc_server import GrpcServer

            grpc_server = await GrpcServer.start(app)
        app.state.grpc_server = grpc_server
        yield
        if grpc_server is not None:
            await grpc_server.stop()
        if watcher is not None:
            watcher.cancel()
        app.state.indexer.cancel()
        await batcher.stop()
        app.state.decoder.close()

    app = FastAPI(
        title="AlexNet (Krizhevsky et al. 2012)",
        version="0.1.0",
        lifespan=lifespan,
        description="Top-k ImageNet predictions and fc7 embeddings from a trained checkpoint.",
    )
    app.state.settings, app.state.metrics = settings, metrics
    app.state.admission, app.state.bodies = Admission(settings, metrics), BodyMemory(settings, metrics)
    app.state.connections = ConnectionGuard(settings, metrics)
    app.state.indexer = None
    errors.install(app)
    app.include_router(routes.inputs)
    app.include_router(routes.public)
    app.include_router(oip_http.public)
    app.include_router(oip_http.protected)
    app.add_middleware(CountRequests, metrics=metrics)
    return app
