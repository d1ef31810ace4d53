"""Dynamic micro-batching with a bounded queue: requests that arrive together share one
forward pass, and no more work waits than the queue allows.

Each request puts its preprocessed crops on a queue and awaits a future. One collector task
takes the first waiting item, then keeps taking items until the batch holds `max_batch`
images or `max_wait_ms` has passed since that first item, runs one forward pass in a worker
thread (the event loop keeps accepting requests meanwhile), and hands every request its
rows. With batching off, every request runs its own forward pass (the baseline).

The work is bounded in images: a request first `reserve`s room for its images (1 or 10
crops), before its body is even read, and keeps it until it is answered; with
`max_queue_images` reserved, `reserve` raises `QueueFull` (the service answers 503 at once,
having spent nothing on the request). A request that gives up (its deadline passed, its
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


class QueueFull(Exception):
    """No room for this request's images."""


class _Room:
    def __init__(self, batcher: "MicroBatcher", images: int):
        self._batcher, self._images = batcher, images

    def __enter__(self) -> "_Room":
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
    def __init__(self, forward: Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor]], *, max_batch: int,
                 max_wait_ms: float, max_queue_images: int, enabled: bool = True,
                 on_batch: Callable[[int], None] | None = None, on_queue: Callable[[int], None] | None = None,
                 on_drop: Callable[[int], None] | None = None):
        self.forward = forward
        self.max_batch = max(1, max_batch)
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue_images = max_queue_images
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

    def reserve(self, images: int) -> "_Room":
        """Room for a request's `images` while it is decoded, queued and run; released when
        the returned context exits. Raises QueueFull at once when there is none."""
        if self.reserved + images > self.max_queue_images:
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
        self._queue.put_nowait(item)
        return await item.future

    async def _next(self) -> _Item:
        """The next item whose request still waits; abandoned ones are dropped here."""
        while True:
            item = await self._queue.get()
            if not item.future.done():
                return item
            self.on_drop(len(item.crops))

    async def _collect(self) -> None:
        while True:
            items = [await self._next()]
            size = len(items[0].crops)
            deadline = time.monotonic() + self.max_wait
            while size < self.max_batch:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._next(), timeout)
                except asyncio.TimeoutError:
                    break
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
                it.future.set_result((logits[start:start + n], embeddings[start:start + n]))
            start += n
