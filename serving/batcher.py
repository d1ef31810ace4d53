"""Dynamic micro-batching with a bounded queue: requests that arrive together share one
forward pass, and no more work waits than the queue allows.

Each request puts its preprocessed crops on a queue and awaits a future. One collector task
takes the first waiting item, then keeps taking items until the batch holds `max_batch`
images or `max_wait_ms` has passed since that first item (and, where decodes and the forward
take turns on a CPU, no request is still decoding, or `max_gather_ms` has passed: a batch
that left them behind would hold up their decodes for a whole forward pass; and a batch
that holds every admitted image goes at once: no one can join it), runs one forward pass in
a worker thread (the event loop keeps accepting requests meanwhile), and hands every request its
rows. With batching off, every request runs its own forward pass (the baseline).

The work is bounded in images: a request `reserve`s room for its images (1 or 10 crops) once
its body is in, and keeps it until it is answered; with `max_queue_images` reserved,
`reserve` raises `QueueFull` (the service answers 503 at once; `has_room` lets it refuse
before reading the body, having spent nothing on the request). A request that gives up (its deadline passed, its
client left) releases its room at once and cancels its future; the collector drops its
images without running them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

GATHER_POLL_S = 0.001  # how often a batch waiting for decodes under way looks again


class QueueFull(Exception):
    """No room for this request's images."""


class _Room:
    def __init__(self, batcher: MicroBatcher, images: int):
        self._batcher, self._images = batcher, images

    def __enter__(self) -> _Room:
        return self

    def __exit__(self, *exc) -> None:
        if self._images:
            self._batcher._count(-self._images)
            self._images = 0


@dataclass(eq=False)
class _Item:
    crops: np.ndarray  # (C, 3, S, S)
    future: asyncio.Future


class MicroBatcher:
    def __init__(
        self,
        forward: Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor]],
        *,
        max_batch: int,
        max_wait_ms: float,
        max_queue_images: int,
        enabled: bool = True,
        incoming: Callable[[], int] | None = None,
        max_gather_ms: float = 0.0,
        on_batch: Callable[[int], None] | None = None,
        on_queue: Callable[[int], None] | None = None,
        on_drop: Callable[[int], None] | None = None,
    ):
        self.forward = forward
        self.max_batch = max(1, max_batch)
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue_images = max_queue_images
        # Requests still decoding (serving.turns). Given: past max_wait, a batch keeps waiting
        # for them while there are any, up to max_gather after its first item; and a batch
        # that holds every admitted image (a lone request) goes at once, without max_wait.
        self.incoming = incoming
        self.max_gather = max(self.max_wait, max_gather_ms / 1000.0)
        self.enabled = enabled
        self.on_batch = on_batch or (lambda n: None)  # images per forward pass
        self.on_queue = on_queue or (lambda n: None)  # images now reserved
        self.on_drop = on_drop or (lambda n: None)  # images dropped unrun (their request gave up)
        self.reserved = 0
        self._queue: asyncio.Queue[_Item] | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        if self.enabled:
            self._task = asyncio.create_task(self._collect())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def has_room(self, images: int) -> bool:
        return self.reserved + images <= self.max_queue_images

    def reserve(self, images: int) -> _Room:
        """Room for a request's `images` while it is decoded, queued and run; released when
        the returned context exits. Raises QueueFull at once when there is none."""
        if not self.has_room(images):
            raise QueueFull(f"{self.reserved} images on their way; room for {self.max_queue_images}")
        self._count(images)
        return _Room(self, images)

    def _count(self, n: int) -> None:
        self.reserved += n
        self.on_queue(self.reserved)

    async def submit(self, crops: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (logits (C, K), embeddings (C, 4096)) for this request's crops (inside `reserve`)."""
        if not self.enabled:
            self.on_batch(len(crops))
            return await asyncio.to_thread(self.forward, crops)
        item = _Item(crops, asyncio.get_running_loop().create_future())
        assert self._queue is not None, "start() first"
        self._queue.put_nowait(item)
        return await item.future

    async def _next(self) -> _Item:
        """The next item whose request still waits; abandoned ones are dropped here."""
        assert self._queue is not None, "start() first"
        while True:
            item = await self._queue.get()
            if not item.future.done():
                return item
            self.on_drop(len(item.crops))

    async def _collect(self) -> None:
        while True:
            items = [await self._next()]
            size = len(items[0].crops)
            start, was_on_way = time.monotonic(), False
            while size < self.max_batch:
                if self.incoming is not None and self.reserved <= size:
                    break  # every admitted image is in this batch: no one can join it, go now
                waited = time.monotonic() - start
                on_way = self.incoming is not None and self.incoming() > 0
                if waited < self.max_wait:
                    timeout = self.max_wait - waited
                elif waited < self.max_gather and (on_way or was_on_way):
                    # Images on their way; and one more look after the last decode ended (its
                    # request submits its crops on a later turn of the event loop).
                    timeout = min(GATHER_POLL_S, self.max_gather - waited)
                else:
                    break
                was_on_way = on_way
                try:
                    item = await asyncio.wait_for(self._next(), timeout)
                except asyncio.TimeoutError:
                    continue
                items.append(item)
                size += len(item.crops)
            assert self._queue is not None
            # Taking turns, what is already queued comes along (else, as before, the next batch's).
            while self.incoming is not None and size < self.max_batch and not self._queue.empty():
                item = self._queue.get_nowait()
                if item.future.done():
                    self.on_drop(len(item.crops))
                    continue
                items.append(item)
                size += len(item.crops)
            await self._run(items)

    async def _run(self, items: list[_Item]) -> None:
        waiting = [it for it in items if not it.future.done()]  # gave up while the batch was collected
        for it in items:
            if it.future.done():
                self.on_drop(len(it.crops))
        if not waiting:
            return
        try:
            batch = np.concatenate([it.crops for it in waiting])
            self.on_batch(len(batch))
            logits, embeddings = await asyncio.to_thread(self.forward, batch)
        except Exception as exc:  # one bad batch must not kill the collector
            for it in waiting:
                if not it.future.done():
                    it.future.set_exception(exc)
            return
        start = 0
        for it in waiting:
            n = len(it.crops)
            if not it.future.done():
                it.future.set_result((logits[start : start + n], embeddings[start : start + n]))
            start += n
