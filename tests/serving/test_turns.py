"""serving.turns: on a CPU, decodes and the forward pass never run at once, and a batch waits
for images still decoding (serving.batcher's max_gather_ms); off, as before."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import torch

from serving.admission import DecodePool
from serving.batcher import MicroBatcher
from serving.settings import Settings
from serving.turns import Turns, takes_turns


def test_auto_takes_turns_on_a_cpu_only():
    auto = Settings.model_construct()
    assert takes_turns(auto, torch.device("cpu")) and not takes_turns(auto, torch.device("cuda", 0))
    assert not takes_turns(Settings.model_construct(take_turns="off"), torch.device("cpu"))
    assert takes_turns(Settings.model_construct(take_turns="on"), torch.device("cuda", 0))


def overlap(turns: Turns) -> bool:
    """Whether a forward pass ran while a decode did, on a pool of 2 decode threads."""
    running = {"decode": 0, "forward": 0}
    seen = []
    lock = threading.Lock()

    def work(kind: str) -> None:
        with lock:
            running[kind] += 1
            seen.append(running["decode"] > 0 and running["forward"] > 0)
        time.sleep(0.02)
        with lock:
            running[kind] -= 1

    def decode() -> None:
        work("decode")

    def forward() -> None:
        with turns.forward():
            work("forward")

    async def main() -> None:
        pool = DecodePool(2, turns)
        decodes = [asyncio.create_task(pool.run(decode)) for _ in range(6)]
        await asyncio.sleep(0.005)
        await asyncio.gather(asyncio.to_thread(forward), *decodes, asyncio.to_thread(forward))
        pool.close()

    asyncio.run(main())
    assert turns.pending == 0
    return any(seen)


def test_decodes_and_the_forward_take_turns():
    assert not overlap(Turns(enabled=True))
    assert overlap(Turns(enabled=False))  # the check can fail: off, they do run at once


def test_a_slow_decode_holds_a_forward_only_for_a_bounded_while():
    """A decode that takes seconds (a 40-megapixel PNG, or one stuck): the forward waits
    max_decode_wait_s for it, then runs beside it, not after it."""
    turns = Turns(max_decode_wait_s=0.05)
    started, release = threading.Event(), threading.Event()

    def slow_decode() -> None:
        with turns.decode():
            started.set()
            release.wait(10)

    decoding = threading.Thread(target=slow_decode)
    decoding.start()
    assert started.wait(10)
    t0 = time.monotonic()
    with turns.forward():
        waited = time.monotonic() - t0
        assert decoding.is_alive()  # the slow decode is still running
    release.set()
    decoding.join(10)
    assert 0.04 < waited < 2.0, waited  # the bound, not the decode's 10 s


def test_pending_counts_decodes_until_they_finish():
    turns = Turns()
    gate = threading.Event()

    async def main() -> None:
        pool = DecodePool(1, turns)
        tasks = [asyncio.create_task(pool.run(gate.wait)) for _ in range(3)]
        await asyncio.sleep(0.01)
        assert turns.pending == 3  # one running, two waiting for the thread
        gate.set()
        await asyncio.gather(*tasks)
        assert turns.pending == 0
        pool.close()

    asyncio.run(main())


def batches_of(incoming: list[int], max_gather_ms: float) -> list[int]:
    """Batch sizes for 4 one-image requests, the last 3 arriving 300 ms after the first (a gap no
    event-loop stall on a busy machine closes; max_wait is 5 ms) while
    `incoming` says they are being decoded."""
    sizes: list[int] = []

    def forward(crops: np.ndarray):
        sizes.append(len(crops))
        return torch.zeros(len(crops), 2), torch.zeros(len(crops), 3)

    async def main() -> None:
        batcher = MicroBatcher(
            forward,
            max_batch=32,
            max_wait_ms=5,
            max_queue_images=32,
            incoming=lambda: incoming[0],
            max_gather_ms=max_gather_ms,
        )
        await batcher.start()
        crops = np.zeros((1, 3, 4, 4), dtype=np.float32)
        batcher.reserve(4)  # four requests admitted: three of them still decoding
        first = asyncio.create_task(batcher.submit(crops))
        await asyncio.sleep(0.3)
        rest = [asyncio.create_task(batcher.submit(crops)) for _ in range(3)]
        incoming[0] = 0
        await asyncio.gather(first, *rest)
        await batcher.stop()

    asyncio.run(main())
    return sizes


def test_a_batch_waits_for_images_still_decoding():
    assert batches_of([3], max_gather_ms=2000) == [4]
    assert batches_of([3], max_gather_ms=0) == [1, 3]  # max_wait alone: the first goes alone
    assert batches_of([0], max_gather_ms=2000) == [1, 3]  # nothing on its way: no wait


def test_a_lone_request_does_not_wait_for_companions():
    """Every admitted image in the batch: it goes at once (max_wait here 2 s); without the
    decode count (take_turns off), the old max_wait stands."""

    async def one(incoming) -> float:
        batcher = MicroBatcher(
            lambda crops: (torch.zeros(len(crops), 2), torch.zeros(len(crops), 3)),
            max_batch=32,
            max_wait_ms=2000,
            max_queue_images=32,
            incoming=incoming,
        )
        await batcher.start()
        t = time.monotonic()
        with batcher.reserve(1):
            await batcher.submit(np.zeros((1, 3, 4, 4), dtype=np.float32))
        await batcher.stop()
        return time.monotonic() - t

    assert asyncio.run(one(lambda: 0)) < 1.0
    assert asyncio.run(one(None)) >= 2.0
