"""Admission control: bounded work, and a fast, honest "no" beyond the bound.

- `Admission` (ASGI middleware): at most `max_in_flight` image requests (/predict, /embed,
  /similar) are served at once; one more gets 503 + Retry-After at once, before its body is
  read. (The second bound is in images: a request reserves room for its crops in the
  batcher before its body is read; serving.batcher.QueueFull, also 503 at once.)
- `within_deadline`: an accepted request that is not answered within `request_timeout_s`
  gets 503 and its work is dropped (its room is released, its queued images are never run; a decode that has
  not started is cancelled; one already running finishes in its thread and is discarded).
- `DecodePool`: at most `max_decodes` images decode at once, in their own threads.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from starlette.types import ASGIApp, Receive, Scope, Send

from serving.errors import ApiError
from serving.metrics import Metrics
from serving.settings import Settings

IMAGE_PATHS = frozenset({"/predict", "/embed", "/similar"})
T = TypeVar("T")


def overloaded(reason: str, detail: str, settings: Settings) -> ApiError:
    return ApiError(503, "overloaded" if reason != "deadline" else "deadline_exceeded", detail,
                    headers={"Retry-After": str(settings.retry_after_s)})


class Admission:
    def __init__(self, app: ASGIApp, settings: Settings, metrics: Metrics):
        self.app, self.settings, self.metrics = app, settings, metrics
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in IMAGE_PATHS:
            return await self.app(scope, receive, send)
        if self.in_flight >= self.settings.max_in_flight:
            self.metrics.rejected.labels("in_flight").inc()
            return await self._refuse(scope, send)
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.set(self.in_flight)

    async def _refuse(self, scope: Scope, send: Send) -> None:
        body = json.dumps({"error": "overloaded", "detail": f"{self.settings.max_in_flight} requests in flight, "
                           "the most this server takes; retry after the Retry-After seconds"}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"retry-after", str(self.settings.retry_after_s).encode())]
        # The body is not read. Within the upload limit the server may skip it and keep the
        # connection; a larger or unsized (chunked) one is not worth reading: close.
        length = dict(scope["headers"]).get(b"content-length", b"")
        if not (length.isdigit() and int(length) <= self.settings.max_upload_bytes):
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def within_deadline(work: Awaitable[T], settings: Settings, metrics: Metrics) -> T:
    """`work`, or 503 deadline_exceeded once `request_timeout_s` has passed (work cancelled)."""
    try:
        return await asyncio.wait_for(work, settings.request_timeout_s)
    except asyncio.TimeoutError:
        metrics.rejected.labels("deadline").inc()
        raise overloaded("deadline", f"not answered within the {settings.request_timeout_s:g} s deadline "
                                     "(the server is busy); the request's work was dropped", settings) from None


class DecodePool:
    """At most `workers` decodes run at once; the others wait, cancellable, in the pool's queue."""

    def __init__(self, workers: int):
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")

    async def run(self, fn: Callable[..., T], *args) -> T:
        # Cancelling the awaiting request cancels a decode that has not started; one that has
        # keeps its thread (and so its place in the bound) until it ends.
        return await asyncio.wrap_future(self._pool.submit(fn, *args))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
