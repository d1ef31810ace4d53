"""Dynamic micro-batching: requests that arrive together share one forward pass.

Each request puts its preprocessed crops on a queue and awaits a future. One collector task
takes the first waiting item, then keeps taking items until the batch holds `max_batch`
images or `max_wait_ms` has passed since that first item, runs one forward pass in a worker
thread (the event loop keeps accepting requests meanwhile), and hands every request its
rows. With batching off, every request runs its own forward pass (the baseline).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class _Item:
    crops: np.ndarray  # (C, 3, S, S)
    future: asyncio.Future


class MicroBatcher:
    def __init__(self, forward: Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor]], max_batch: int,
                 max_wait_ms: float, enabled: bool = True, on_batch: Callable[[int], None] | None = None):
        self.forward = forward
        self.max_batch = max(1, max_batch)
        self.max_wait = max_wait_ms / 1000.0
        self.enabled = enabled
        self.on_batch = on_batch or (lambda n: None)
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
        """-> (logits (C, K), embeddings (C, 4096)) for this request's crops."""
        if not self.enabled:
            self.on_batch(len(crops))
            return await asyncio.to_thread(self.forward, crops)
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Item(crops, future))
        return await future

    async def _collect(self) -> None:
        queue = self._queue
        while True:
            items = [await queue.get()]
            size = len(items[0].crops)
            deadline = time.monotonic() + self.max_wait
            while size < self.max_batch:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    break
                try:
                    item = await asyncio.wait_for(queue.get(), timeout)
                except asyncio.TimeoutError:
                    break
                items.append(item)
                size += len(item.crops)
            await self._run(items)

    async def _run(self, items: list[_Item]) -> None:
        try:
            batch = np.concatenate([it.crops for it in items])
            self.on_batch(len(batch))
            logits, embeddings = await asyncio.to_thread(self.forward, batch)
        except Exception as exc:  # one bad batch must not kill the collector
            for it in items:
                if not it.future.done():
                    it.future.set_exception(exc)
            return
        start = 0
        for it in items:
            n = len(it.crops)
            if not it.future.done():
                it.future.set_result((logits[start:start + n], embeddings[start:start + n]))
            start += n
