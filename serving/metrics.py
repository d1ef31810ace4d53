"""The service's Prometheus metrics, one registry per app (GET /metrics).

Requests by endpoint and status, latency, batch sizes, checkpoint switches; the admission
figures (requests in flight, images on their way to a forward pass, body bytes held,
rejections by reason, images dropped unrun); the connection edge (open connections, and
connections dropped by reason: slow or idle clients, too many from one address); and the
process collector (RSS, CPU seconds, open file descriptors).
"""

from __future__ import annotations

import re
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from starlette.types import ASGIApp, Receive, Scope, Send

# Paths counted under their own label; anything else is "other" (bounded label values). The
# Open Inference Protocol's are counted by their template (the model's name and version out);
# its gRPC calls as "grpc <Method>" (serving.oip.grpc_server).
ENDPOINTS = frozenset({"/predict", "/embed", "/similar", "/index", "/health", "/ready", "/metrics", "/"})
V2_ENDPOINTS = frozenset(
    {
        "/v2",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/{name}",
        "/v2/models/{name}/ready",
        "/v2/models/{name}/infer",
    }
)
_V2_MODEL = re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?")


def endpoint_label(path: str) -> str:
    if path in ENDPOINTS:
        return path
    template = _V2_MODEL.sub("/v2/models/{name}", path)
    return template if template in V2_ENDPOINTS else "other"


REJECTED_REASONS = ("in_flight", "queue_full", "body_memory", "deadline")
DROPPED_REASONS = (
    "per_client",
    "max_connections",
    "idle_timeout",
    "header_timeout",
    "header_too_large",
    "body_timeout",
)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.requests = Counter(
            "alexnet_requests",
            'Requests by endpoint and status (HTTP; gRPC calls as "grpc <Method>")',
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "alexnet_request_latency_seconds",
            "Request latency",
            ["endpoint"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "alexnet_batch_size",
            "Images per forward pass",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )
        self.reloads = Counter(
            "alexnet_checkpoint_reloads", "Switches to a newer checkpoint of the run", registry=self.registry
        )
        self.in_flight = Gauge(
            "alexnet_in_flight_requests", "Image requests admitted and not yet answered", registry=self.registry
        )
        self.queued = Gauge(
            "alexnet_queue_images",
            "Images of admitted requests being decoded, queued for the micro-batcher or run (the room they reserved)",
            registry=self.registry,
        )
        self.rejected = Counter(
            "alexnet_rejected_requests",
            "Requests refused by admission control, by reason (in_flight, queue_full, body_memory, deadline)",
            ["reason"],
            registry=self.registry,
        )
        self.body_bytes = Gauge(
            "alexnet_body_bytes",
            "Bytes of request bodies held in memory (received, or being received, and not yet answered)",
            registry=self.registry,
        )
        self.open_connections = Gauge("alexnet_open_connections", "Client connections open", registry=self.registry)
        self.dropped_connections = Counter(
            "alexnet_dropped_connections",
            "Connections closed by the server's edge, by reason: per_client and "
            "max_connections (over the bound, at accept), idle_timeout (nothing sent), header_timeout and "
            "body_timeout (408), header_too_large (431)",
            ["reason"],
            registry=self.registry,
        )
        self.dropped = Counter(
            "alexnet_dropped_images", "Queued images never run: their request gave up", registry=self.registry
        )
        for reason in REJECTED_REASONS:
            self.rejected.labels(reason)
        for reason in DROPPED_REASONS:
            self.dropped_connections.labels(reason)


class CountRequests:
    """ASGI middleware: count every response by endpoint and status, and observe latency."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        endpoint = endpoint_label(scope["path"])
        status = "500"

        async def counting_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.requests.labels(endpoint, status).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
