"""Decoding and the forward pass take turns on the CPU (settings.take_turns).

On a CPU the forward pass runs on every core (PyTorch's intra-op threads, or ONNX Runtime's),
and the decode pool's threads want the same cores. Run at once, they do not share them: the
forward's threads meet at a barrier after every layer, and the thread that lost its core to
a decode holds up the others, which spin. Measured on the 2-core reference machine, a batch
of 32 took 385 ms alone and 1630 ms beside two decoding threads (4.2x), while the decodes
themselves ran at 75% of their speed: that contention, not the decode's own cost, is what
cost the service its throughput under load (docs/benchmarks.md, "Serving").

`Turns` is a shared/exclusive gate: decodes share it (up to the pool's bound), a forward
pass holds it alone. A forward that asks waits only for the decodes already running (a
decode is ~1.5 ms), and for at most `max_decode_wait_s`; no new decode starts until it is done. It also counts the decodes
submitted and not finished, so the batcher can wait for images already on their way instead
of sending a small batch and leaving them to contend with it (serving.batcher).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from serving.settings import Settings


def takes_turns(settings: Settings, device: torch.device) -> bool:
    """settings.take_turns resolved for the device the model runs on."""
    return settings.take_turns == "on" or (settings.take_turns == "auto" and device.type == "cpu")


class Turns:
    """`max_decode_wait_s` bounds how long a forward waits for decodes already running: a
    JPEG decodes in milliseconds, but a 40-megapixel PNG within the limits takes about a
    second, and one slow (or stuck) decode must not hold every batch and every other decode."""

    def __init__(self, enabled: bool = True, max_decode_wait_s: float = 0.05):
        self.enabled = enabled
        self.max_decode_wait_s = max_decode_wait_s
        self._cond = threading.Condition()
        self._decoding = 0  # decodes holding the gate now
        self._forward_waiting = 0
        self._forwarding = False
        self._pending = 0  # decodes submitted and not finished (waiting or running)

    @property
    def pending(self) -> int:
        """Decodes submitted and not yet finished (the batcher's images on their way)."""
        return self._pending if self.enabled else 0

    def submitted(self) -> None:
        with self._cond:
            self._pending += 1

    def finished(self) -> None:
        with self._cond:
            self._pending -= 1

    @contextmanager
    def decode(self) -> Iterator[None]:
        """Held while one image decodes: waits while a forward pass runs or waits."""
        if not self.enabled:
            yield
            return
        with self._cond:
            while self._forwarding or self._forward_waiting:
                self._cond.wait()
            self._decoding += 1
        try:
            yield
        finally:
            with self._cond:
                self._decoding -= 1
                if not self._decoding:
                    self._cond.notify_all()

    @contextmanager
    def forward(self) -> Iterator[None]:
        """Held while a forward pass runs: no decode runs meanwhile."""
        if not self.enabled:
            yield
            return
        with self._cond:
            self._forward_waiting += 1
            try:
                deadline = time.monotonic() + self.max_decode_wait_s
                while True:
                    if self._forwarding:  # one forward at a time, however long
                        self._cond.wait()
                        continue
                    left = deadline - time.monotonic()
                    if not self._decoding or left <= 0:
                        break  # a decode still running past the bound runs beside this forward
                    self._cond.wait(left)
            finally:
                self._forward_waiting -= 1
            self._forwarding = True
        try:
            yield
        finally:
            with self._cond:
                self._forwarding = False
                self._cond.notify_all()
