"""The FastAPI app: `create_app(settings)`; the model is loaded in the lifespan.

Assembly only; each job has its module: routes (the endpoints), auth (the bearer-token
dependency), upload (the body within its limit), admission (in-flight bound, deadline,
decode pool), batcher (micro-batching with a bounded queue), metrics (Prometheus),
indexing (the /similar index off the request path), reload (following a run folder),
errors (the JSON error bodies), settings (every default and limit).

Middleware, outermost first: CountRequests (every answer counted, 503s included), then
Admission (the in-flight bound, before a request's body is read).
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from fastapi import FastAPI

from serving import errors, routes
from serving.admission import Admission, DecodePool
from serving.batcher import MicroBatcher
from serving.indexing import Indexer
from serving.metrics import CountRequests, Metrics
from serving.predictor import Predictor
from serving.reload import watch_checkpoints
from serving.settings import Settings


def create_app(settings: Settings) -> FastAPI:
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Loading fails loudly (missing, incomplete or mismatched checkpoint): no half-up server.
        app.state.predictor = await asyncio.to_thread(Predictor, settings.checkpoint, settings)
        # The batcher runs whichever model is current when a batch goes out (see serving.reload).
        batcher = MicroBatcher(lambda crops: app.state.predictor.forward(crops), max_batch=settings.max_batch,
                               max_wait_ms=settings.max_wait_ms, max_queue_images=settings.max_queue_images,
                               enabled=settings.batching, on_batch=metrics.batch_size.observe,
                               on_queue=metrics.queued.set, on_drop=metrics.dropped.inc)
        await batcher.start()
        app.state.batcher = batcher
        app.state.decoder = DecodePool(settings.max_decodes)
        app.state.indexer = Indexer(lambda: app.state.predictor, settings.max_batch, settings.max_index_images)
        if settings.index is not None:  # in the background: /ready does not wait for it
            app.state.indexer.start_configured(settings.index, settings.index_split)
        watcher = None
        if settings.watch_s > 0 and settings.run_dir is not None:
            watcher = asyncio.create_task(watch_checkpoints(app, settings))
        yield
        if watcher is not None:
            watcher.cancel()
        app.state.indexer.cancel()
        await batcher.stop()
        app.state.decoder.close()

    app = FastAPI(title="AlexNet (Krizhevsky et al. 2012)", version="0.1.0", lifespan=lifespan,
                  description="Top-k ImageNet predictions and fc7 embeddings from a trained checkpoint.")
    app.state.settings, app.state.metrics = settings, metrics
    app.state.indexer = None
    errors.install(app)
    app.include_router(routes.inputs)
    app.include_router(routes.public)
    app.add_middleware(Admission, settings=settings, metrics=metrics)
    app.add_middleware(CountRequests, metrics=metrics)  # added last = outermost
    return app
