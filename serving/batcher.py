"""Dynamic micro-batching with a bounded queue: requests that arrive together share one
forward pass, and no more work waits than the queue allows.

Each request puts its preprocessed crops on a queue and awaits a future. One collector task
takes the first waiting item, then keeps taking items until the batch holds `max_batch`
images or `max_wait_ms` has passed since that first item, runs one forward pass in a worker
thread (the event loop keeps accepting requests meanwhile), and hands every request its
rows. With batching off, every request runs its own forward pass (the baseline).

The queue holds at most `max_queue_images` images: `submit` raises `QueueFull` beyond that
(the service answers 503 at once). A request that gives up (its deadline passed, its client
left) cancels its future; its images leave the queue's count at once and the collector
drops them without running them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


class QueueFull(Exception):
    """The batcher's queue has no room for this request's images."""


@dataclass(eq=False)
class _Item:
    crops: np.ndarray  # (C, 3, S, S)
    future: asyncio.Future
    queued: bool = True  # still counted in the queue's size


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
        self.on_queue = on_queue or (lambda n: None)  # images now queued
        self.on_drop = on_drop or (lambda n: None)  # images dropped unrun (their request gave up)
        self.queued_images = 0
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

    async def submit(self, crops: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (logits (C, K), embeddings (C, 4096)) for this request's crops. Raises QueueFull."""
        n = len(crops)
        if self.queued_images + n > self.max_queue_images:
            raise QueueFull(f"{self.queued_images} images queued; room for {self.max_queue_images}")
        if not self.enabled:
            self._count(n)
            try:
                self.on_batch(n)
                return await asyncio.to_thread(self.forward, crops)
            finally:
                self._count(-n)
        item = _Item(crops, asyncio.get_running_loop().create_future())
        item.future.add_done_callback(lambda f: self._dequeue(item))
        self._count(n)
        self._queue.put_nowait(item)
        return await item.future

    def _count(self, n: int) -> None:
        self.queued_images += n
        self.on_queue(self.queued_images)

    def _dequeue(self, item: _Item) -> None:
        """Take `item` out of the queue's count (once): when collected, or when its request gives up."""
        if item.queued:
            item.queued = False
            self._count(-len(item.crops))

    async def _next(self) -> _Item:
        """The next item whose request still waits; abandoned ones are dropped here."""
        while True:
            item = await self._queue.get()
            if not item.future.done():
                self._dequeue(item)
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
