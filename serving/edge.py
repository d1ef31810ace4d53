"""The connection edge: what a slow, idle or greedy client can hold, bounded below the app.

uvicorn has a keep-alive timeout but no header or body deadline and no header size limit
(with httptools), and its `limit_concurrency` counts idle sockets: a thousand connections
that never finish their headers, from one address, made every other client get 503,
/health included. `ConnectionGuard.protocol()` is uvicorn's httptools protocol with, per
connection (nginx's client_header_timeout, client_body_timeout and limit_conn; Go's
ReadHeaderTimeout):
- a place, taken at accept: at most `max_connections_per_client` open connections per client
  address and `max_connections` in all; one more is answered 503 + Retry-After at once and
  closed, holding no place;
- the header deadline: a request's line and headers must arrive within `header_timeout_s`
  (from the connection's opening, or from the first byte of the next request on a kept-alive
  one) and within `max_header_bytes`; else 408 (431) and the connection is closed. One that
  sent nothing at all is closed without an answer (an unused preconnect is not an error);
- the body backstop: a body still arriving `body_timeout_s` + BACKSTOP_GRACE_S after its
  headers (one the app never reads, sent after an early answer, say) closes the connection,
  with a 408 if nothing was answered yet. The app reads the bodies it wants within
  `body_timeout_s` itself (serving.upload) and answers the 408 a client normally sees.
Every answer the edge writes itself, and every answer of the app that closes the connection
while the request's body is still coming (408, 413, a 503 before the body was read), closes
it the way nginx's lingering close does: the answer, then our end shut for writing, then for
up to LINGER_S whatever the client still sends is read and dropped, so that it reads the
answer rather than a reset (closing a socket with unread bytes resets it, and the client
loses the answer). At most `max_connections` connections linger at once; beyond, they are
closed at once.
Every connection dropped is counted in /metrics (`alexnet_dropped_connections_total` by
reason), the open ones in `alexnet_open_connections`. The bounds are per process: behind a
proxy every client has the proxy's address (deploy/README.md).
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from serving.metrics import Metrics
from serving.settings import Settings

# The app's own body deadline (serving.upload) answers first; this one catches the rest.
BACKSTOP_GRACE_S = 2.0
LINGER_S = 1.0  # how long a connection answered by the edge reads and drops what still comes
_PHRASES = {408: "Request Timeout", 431: "Request Header Fields Too Large", 503: "Service Unavailable"}


def canned(status: int, error: str, detail: str, retry_after: int | None = None) -> bytes:
    """A whole response, written by the protocol itself (no app, no request), closing."""
    body = json.dumps({"error": error, "detail": detail}).encode()
    head = [
        f"HTTP/1.1 {status} {_PHRASES[status]}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
    ]
    if retry_after is not None:
        head.append(f"retry-after: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class ConnectionGuard:
    """The open connections, per client address and in all, and the protocol that keeps them
    within their bounds and deadlines."""

    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings, self.metrics = settings, metrics
        self.per_client: Counter[str | None] = Counter()
        self.open = 0
        self.lingering = 0

    def take(self, peer: str | None) -> str | None:
        """A place for a new connection from `peer`, or the reason there is none."""
        if self.open >= self.settings.max_connections:
            return "max_connections"
        if peer is not None and self.per_client[peer] >= self.settings.max_connections_per_client:
            return "per_client"
        self.open += 1
        self.per_client[peer] += 1
        self.metrics.open_connections.set(self.open)
        return None

    def give_back(self, peer: str | None) -> None:
        self.open -= 1
        self.per_client[peer] -= 1
        if not self.per_client[peer]:
            del self.per_client[peer]
        self.metrics.open_connections.set(self.open)

    def dropped(self, reason: str) -> None:
        self.metrics.dropped_connections.labels(reason).inc()

    def protocol(self) -> type[HttpToolsProtocol]:
        """uvicorn's `http=` class, bound to this guard."""
        return type("GuardedHttpToolsProtocol", (GuardedProtocol,), {"guard": self})


class GuardedProtocol(HttpToolsProtocol):
    guard: ConnectionGuard  # bound by ConnectionGuard.protocol()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._peer = self.client[0] if self.client else None
        self._timer: asyncio.TimerHandle | None = None
        self._phase: str | None = None  # "header", "body" or None (between requests)
        self._header_bytes = 0
        self._received = False  # any byte of the request in its header phase
        self._lingering = False  # answered by the edge: what still comes is dropped
        refused = self.guard.take(self._peer)
        self._placed = refused is None
        if refused is not None:
            self.guard.dropped(refused)
            s = self.guard.settings
            detail = (
                f"{s.max_connections_per_client} connections from your address are open, the most this server "
                "takes from one address; reuse them, or retry after the Retry-After seconds"
                if refused == "per_client"
                else f"the server has {s.max_connections} connections open, the most it takes; retry after the "
                "Retry-After seconds"
            )
            self._answer_and_close(canned(503, "too_many_connections", detail, s.retry_after_s))
            return
        self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        if self._lingering:
            self._lingering = False
            self.guard.lingering -= 1
        if self._placed:
            self._placed = False
            self.guard.give_back(self._peer)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering or not self._placed:
            return
        if self._phase == "header":
            self._header_bytes += len(data)
            self._received = True
        super().data_received(data)
        # Counted per read, checked once the parser had it: a read that completed the
        # headers (and carries body bytes) is not held against them.
        if (
            self._phase == "header"
            and self._header_bytes > self.guard.settings.max_header_bytes
            and not self.transport.is_closing()
        ):
            self.guard.dropped("header_too_large")
            self._close_with(
                431, "header_too_large", f"request line and headers over {self.guard.settings.max_header_bytes:,} bytes"
            )

    # httptools callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._phase != "header":  # the next request on a kept-alive connection: its own clock
            self._await_headers()
        self._received = True

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        if self.cycle is not None:  # the app's close, while the body still comes, lingers
            # duck-typed: everything as the transport's but close() (uvicorn types the slot Transport)
            self.cycle.transport = cast(asyncio.Transport, _GentleClose(self))
        self._cancel()
        self._phase = "body"  # until on_message_complete, which comes at once for a bodiless request
        self._arm(self.guard.settings.body_timeout_s + BACKSTOP_GRACE_S)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._cancel()
        self._phase = None

    # deadlines
    def _await_headers(self) -> None:
        self._cancel()
        self._phase, self._header_bytes, self._received = "header", 0, False
        self._arm(self.guard.settings.header_timeout_s)

    def _arm(self, delay: float) -> None:
        self._timer = self.loop.call_later(delay, self._expired)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self.transport.is_closing() or self._lingering:
            return
        s = self.guard.settings
        if self._phase == "header" and not self._received:
            self.guard.dropped("idle_timeout")
            self.transport.close()
        elif self._phase == "header":
            self.guard.dropped("header_timeout")
            self._close_with(
                408, "request_timeout", f"the request's headers did not arrive within {s.header_timeout_s:g} s"
            )
        else:
            self.guard.dropped("body_timeout")
            if self.cycle is not None and self.cycle.response_started:
                self.transport.close()  # answered already; the rest of its body is not worth waiting for
            else:
                self._close_with(
                    408, "request_timeout", f"the request's body did not arrive within {s.body_timeout_s:g} s"
                )

    def _close_with(self, status: int, error: str, detail: str) -> None:
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:  # the app's answer, if any, goes nowhere now
            cycle.disconnected = True
            cycle.message_event.set()
        self._answer_and_close(canned(status, error, detail))

    def _answer_and_close(self, response: bytes) -> None:
        """Write `response`, then close, lingering."""
        self.transport.write(response)
        self._linger()

    def _close_gently(self) -> None:
        """The app closes: lingering if the request's body is still coming, else at once."""
        if self._phase == "body" and not self._lingering:
            self._linger()
        elif not self._lingering:
            self.transport.close()

    def _linger(self) -> None:
        """Shut our end, read and drop what comes for up to LINGER_S, then close."""
        self._cancel()
        transport = self.transport
        if self.guard.lingering >= self.guard.settings.max_connections or not transport.can_write_eof():
            transport.close()
            return
        self._lingering = True
        self.guard.lingering += 1
        self.pipeline.clear()  # requests queued behind this one are not answered
        transport.write_eof()
        transport.resume_reading()  # it may have been paused with a body unread
        self._timer = self.loop.call_later(LINGER_S, transport.close)


class _GentleClose:
    """A request's view of its connection (uvicorn's cycle writes and closes through it):
    everything as the transport's, but close() lingers while the request's body still comes."""

    def __init__(self, protocol: GuardedProtocol):
        self._protocol, self._transport = protocol, protocol.transport

    def close(self) -> None:
        self._protocol._close_gently()

    def __getattr__(self, name: str):
        return getattr(self._transport, name)
