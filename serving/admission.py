"""Admission control: bounded work, and a fast, honest "no" beyond the bound.

An image request (/predict, /embed, /similar) is admitted only once its body is in (a slow
upload holds no model capacity: serving.upload reads it within its deadline and the body
memory), then holds, until it is answered:
- `Admission.admit`: one of `max_in_flight` places; none left: 503 + Retry-After;
- the batcher's room for its images (serving.batcher.reserve; none: QueueFull, 503);
  `admitted` takes both (the image endpoints and the Open Inference Protocol's inference).
- `refuse_now`: before reading a body, a request that could not be admitted right now gets
  that 503 at once, its body unread (a full server spends nothing on it); one that passes
  may still find the server full once its body is in.
- `within_deadline`: an admitted request that is not answered within `request_timeout_s`
  gets 503 and its work is dropped (its room is released, its queued images are never run; a decode that has
  not started is cancelled; one already running finishes in its thread and is discarded).
- `DecodePool`: at most `max_decodes` images decode at once, in their own threads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

from serving.batcher import MicroBatcher, QueueFull
from serving.errors import ApiError
from serving.metrics import Metrics
from serving.settings import Settings
from serving.turns import Turns

T = TypeVar("T")


def overloaded(reason: str, detail: str, settings: Settings, close: bool = False) -> ApiError:
    headers = {"Retry-After": str(settings.retry_after_s)}
    if close:
        headers["Connection"] = "close"
    return ApiError(503, "overloaded" if reason != "deadline" else "deadline_exceeded", detail, headers=headers)


class Admission:
    """At most `max_in_flight` image requests admitted (body in, not yet answered) at once."""

    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings, self.metrics = settings, metrics
        self.in_flight = 0

    @property
    def full(self) -> bool:
        return self.in_flight >= self.settings.max_in_flight

    def refused(self, close: bool = False) -> ApiError:
        self.metrics.rejected.labels("in_flight").inc()
        return overloaded(
            "in_flight",
            f"{self.settings.max_in_flight} requests in flight, the most this server "
            "takes; retry after the Retry-After seconds",
            self.settings,
            close,
        )

    @contextmanager
    def admit(self) -> Iterator[None]:
        if self.full:
            raise self.refused()
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)
        try:
            yield
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.set(self.in_flight)


@contextmanager
def admitted(admission: Admission, batcher: MicroBatcher, images: int) -> Iterator[None]:
    """A request whose body is in: a place in flight and the batcher's room for its `images`,
    both held until the block ends; else 503 at once."""
    with admission.admit():
        try:
            room = batcher.reserve(images)
        except QueueFull as exc:
            admission.metrics.rejected.labels("queue_full").inc()
            raise overloaded(
                "queue_full", f"the server is full ({exc}); retry after the Retry-After seconds", admission.settings
            ) from None
        with room:
            yield


def refuse_now(admission: Admission, batcher: MicroBatcher, images: int, headers: Mapping[str, str]) -> None:
    """503 at once, before the body is read, if the request could not be admitted now."""
    settings = admission.settings
    # The body is not read. Within the upload limit the server may skip it and keep the
    # connection; a larger or unsized (chunked) one is not worth reading: close.
    length = headers.get("content-length", "")
    close = not (length.isdigit() and int(length) <= settings.max_upload_bytes)
    if admission.full:
        raise admission.refused(close)
    if not batcher.has_room(images):
        admission.metrics.rejected.labels("queue_full").inc()
        raise overloaded(
            "queue_full",
            f"the server is full ({batcher.reserved} images on their way, room for "
            f"{batcher.max_queue_images}); retry after the Retry-After seconds",
            settings,
            close,
        )


async def within_deadline(work: Awaitable[T], settings: Settings, metrics: Metrics) -> T:
    """`work`, or 503 deadline_exceeded once `request_timeout_s` has passed (work cancelled)."""
    try:
        return await asyncio.wait_for(work, settings.request_timeout_s)
    except asyncio.TimeoutError:
        metrics.rejected.labels("deadline").inc()
        raise overloaded(
            "deadline",
            f"not answered within the {settings.request_timeout_s:g} s deadline "
            "(the server is busy); the request's work was dropped",
            settings,
        ) from None


class DecodePool:
    """At most `workers` decodes run at once; the others wait, cancellable, in the pool's queue.
    With `turns` (serving.turns), a decode runs only while no forward pass does."""

    def __init__(self, workers: int, turns: Turns | None = None):
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")
        self._turns = turns if turns is not None else Turns(enabled=False)

    async def run(self, fn: Callable[..., T], *args) -> T:
        # Cancelling the awaiting request cancels a decode that has not started; one that has
        # keeps its thread (and so its place in the bound) until it ends.
        self._turns.submitted()
        try:
            return await asyncio.wrap_future(self._pool.submit(self._in_turn, fn, *args))
        finally:  # on the event loop, as the request goes on to the batcher
            self._turns.finished()

    def _in_turn(self, fn: Callable[..., T], *args) -> T:
        with self._turns.decode():
            return fn(*args)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
