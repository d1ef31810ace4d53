"""The Open Inference Protocol over gRPC: `inference.GRPCInferenceService` (KServe's
grpc_predict_v2.proto, vendored beside this file; Triton's clients speak it) and the standard
health service `grpc.health.v1.Health`, on settings.grpc_port.

The server runs in the app's own event loop, started by the app's lifespan once the model is
loaded (serving.app) and stopped at shutdown (calls in flight get GRACE_S), so a call shares
everything an HTTP request has: the model, the micro-batcher, admission, the body memory, the
decode pool and the metrics (`alexnet_requests_total{endpoint="grpc ModelInfer", status="OK"}`).

    ServerLive, ServerReady, ModelReady, grpc.health.v1 Check/Watch   open (probes)
    ServerMetadata, ModelMetadata, ModelInfer                       the token, when the server has one:
                                                                    metadata `authorization: Bearer <token>`,
                                                                    else UNAUTHENTICATED
    RepositoryModelLoad, RepositoryModelUnload                      UNIMPLEMENTED

ModelInfer takes its inputs as raw_input_contents (what Triton's clients send) or as typed
contents, and answers in raw_output_contents. Errors are gRPC status codes with the message as
details (STATUS): a bad request INVALID_ARGUMENT, an unknown model NOT_FOUND, an overloaded
server RESOURCE_EXHAUSTED with `retry-after` (seconds) and `grpc-retry-pushback-ms` in the
trailing metadata, a request over its deadline DEADLINE_EXCEEDED.

gRPC's own limits (serving.settings, grpc_*) bound what reaches the app: a whole message is at
most max_upload_bytes, grpc_max_concurrent_rpcs calls at once (more get RESOURCE_EXHAUSTED
from gRPC before their message is read), grpc_max_streams_per_connection per connection,
grpc_max_connections connections, metadata within max_header_bytes, idle connections closed,
every connection closed after grpc_max_connection_age_s (its calls get body_timeout_s more: a
message sent slowly holds a call no longer), keepalive pings sent and abusive ones refused.
SO_REUSEPORT is off: a second server on the same port is an error, not a silent share of its
traffic.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from fastapi import FastAPI
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from serving.admission import refuse_now
from serving.auth import token_matches
from serving.errors import ApiError
from serving.oip import grpc_predict_v2_pb2 as pb
from serving.oip import grpc_predict_v2_pb2_grpc as pb_grpc
from serving.oip import protocol
from serving.oip.protocol import InferRequest, InferResponse
from serving.oip.tensors import check_shape, from_contents, from_raw, invalid, to_raw
from serving.settings import Settings

log = logging.getLogger("serving")
SERVICE = "inference.GRPCInferenceService"
GRACE_S = 5.0
STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    503: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
# Where the ApiError's own name says more than its HTTP status.
STATUS_BY_ERROR = {"deadline_exceeded": grpc.StatusCode.DEADLINE_EXCEEDED, "not_ready": grpc.StatusCode.UNAVAILABLE}
# Each contents field of InferTensorContents, by datatype.
CONTENTS = {"FP32": "fp32_contents", "FP64": "fp64_contents", "INT64": "int64_contents", "INT32": "int_contents"}

T = TypeVar("T")


def options(settings: Settings) -> list[tuple[str, Any]]:
    """The server's channel arguments: its limits (serving.settings, grpc_*)."""
    ms = lambda s: int(s * 1000)  # noqa: E731
    return [
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", settings.max_upload_bytes),
        ("grpc.max_concurrent_streams", settings.grpc_max_streams_per_connection),
        ("grpc.max_allowed_incoming_connections", settings.grpc_max_connections),
        ("grpc.max_metadata_size", settings.max_header_bytes),
        ("grpc.max_connection_idle_ms", ms(settings.grpc_idle_timeout_s)),
        ("grpc.max_connection_age_ms", ms(settings.grpc_max_connection_age_s)),
        ("grpc.max_connection_age_grace_ms", ms(settings.body_timeout_s)),
        ("grpc.keepalive_time_ms", ms(settings.grpc_keepalive_s)),
        ("grpc.keepalive_timeout_ms", ms(min(20.0, settings.grpc_keepalive_s))),
        ("grpc.http2.min_ping_interval_without_data_ms", ms(settings.grpc_min_ping_interval_s)),
        ("grpc.http2.max_ping_strikes", 2),
    ]


class GrpcServer:
    """The running server: `await GrpcServer.start(app)`, `await server.stop()`."""

    def __init__(self, server: grpc.aio.Server, health_servicer: health.aio.HealthServicer, port: int):
        self.server, self.health, self.port = server, health_servicer, port

    @classmethod
    async def start(cls, app: FastAPI) -> GrpcServer:
        settings: Settings = app.state.settings
        server = grpc.aio.server(options=options(settings), maximum_concurrent_rpcs=settings.grpc_max_concurrent_rpcs)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(app), server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        address = f"{host}:{settings.grpc_port}"
        try:
            port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise RuntimeError(
                f"cannot serve gRPC on {address} ({exc}): is the port in use? Set ALEXNET_GRPC_PORT "
                "(--grpc-port), or turn gRPC off (ALEXNET_GRPC=false, --no-grpc)"
            ) from None
        await server.start()
        for service in ("", SERVICE):
            await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("gRPC: %s and grpc.health.v1.Health on %s:%d", SERVICE, host, port)
        return cls(server, health_servicer, port)

    async def stop(self) -> None:
        await self.health.enter_graceful_shutdown()  # probes see NOT_SERVING while calls finish
        await self.server.stop(GRACE_S)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, app: FastAPI):
        self.state = app.state

    async def ServerLive(self, request, context):
        return await self._serve("ServerLive", context, False, lambda: _value(pb.ServerLiveResponse(live=True)))

    async def ServerReady(self, request, context):
        ready = getattr(self.state, "predictor", None) is not None
        return await self._serve("ServerReady", context, False, lambda: _value(pb.ServerReadyResponse(ready=ready)))

    async def ModelReady(self, request, context):
        async def ready():
            protocol.current(self.state, request.name, request.version)
            return pb.ModelReadyResponse(ready=True)

        return await self._serve("ModelReady", context, False, ready)

    async def ServerMetadata(self, request, context):
        return await self._serve(
            "ServerMetadata", context, True, lambda: _value(pb.ServerMetadataResponse(**protocol.server_metadata()))
        )

    async def ModelMetadata(self, request, context):
        async def metadata():
            doc = protocol.model_metadata(self.state, request.name, request.version)
            tensors = pb.ModelMetadataResponse.TensorMetadata
            return pb.ModelMetadataResponse(
                name=doc["name"],
                versions=doc["versions"],
                platform=doc["platform"],
                inputs=[tensors(**t) for t in doc["inputs"]],
                outputs=[tensors(**t) for t in doc["outputs"]],
            )

        return await self._serve("ModelMetadata", context, True, metadata)

    async def ModelInfer(self, request, context):
        async def infer():
            state = self.state
            protocol.current(state, request.model_name, request.model_version)
            refuse_now(state.admission, state.batcher, 1, {})  # a full server: no work spent on it
            with state.bodies.share() as share:
                share.take(request.ByteSize())  # the message, held until the call is answered
                answer = await protocol.infer(state, infer_request(request))
            return infer_response(answer)

        return await self._serve("ModelInfer", context, True, infer)

    async def _serve(
        self, method: str, context: grpc.aio.ServicerContext, protected: bool, work: Callable[[], Awaitable[T]]
    ) -> T:
        metrics = self.state.metrics
        t0, code = time.perf_counter(), grpc.StatusCode.OK
        try:
            if protected and not token_matches(self.state.settings, _bearer(context)):
                raise ApiError(
                    401, "unauthorized", "missing or wrong bearer token (metadata authorization: Bearer <token>)"
                )
            return await work()
        except ApiError as exc:
            code = STATUS_BY_ERROR.get(exc.error) or STATUS.get(exc.status, grpc.StatusCode.INTERNAL)
            trailing: tuple[tuple[str, str], ...] = ()
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                after = self.state.settings.retry_after_s
                trailing = (("retry-after", str(after)), ("grpc-retry-pushback-ms", str(after * 1000)))
            await context.abort(code, exc.detail, trailing_metadata=trailing)
            raise  # abort raises; unreachable
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except grpc.aio.AbortError:
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log.exception("gRPC %s failed", method)
            await context.abort(code, "the server failed on this request; it is still up")
            raise
        finally:
            endpoint = f"grpc {method}"
            metrics.requests.labels(endpoint, code.name).inc()
            metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)


async def _value(message: T) -> T:
    return message


def _bearer(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def _parameters(entries) -> dict[str, Any]:
    """An InferParameter map -> its values (a parameter of a kind this proto lacks: None)."""
    out = {}
    for key, value in entries.items():
        kind = value.WhichOneof("parameter_choice")
        out[key] = getattr(value, kind) if kind else None
    return out


def infer_request(request: pb.ModelInferRequest) -> InferRequest:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise invalid(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    inputs = []
    for i, t in enumerate(request.inputs):
        shape = check_shape(t.name, list(t.shape))
        if raw:
            inputs.append(from_raw(t.name, t.datatype, shape, raw[i]))
            continue
        field = "bytes_contents" if t.datatype == "BYTES" else CONTENTS.get(t.datatype)
        if field is None:
            raise invalid(f"input {t.name!r}: datatype {t.datatype!r} is not one this model takes")
        inputs.append(from_contents(t.name, t.datatype, shape, getattr(t.contents, field)))
    return InferRequest(
        request.model_name,
        request.model_version,
        inputs,
        [o.name for o in request.outputs] or None,
        _parameters(request.parameters),
        request.id,
    )


def infer_response(answer: InferResponse) -> pb.ModelInferResponse:
    tensor = pb.ModelInferResponse.InferOutputTensor
    return pb.ModelInferResponse(
        model_name=answer.model_name,
        model_version=answer.model_version,
        id=answer.id,
        outputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in answer.outputs],
        raw_output_contents=[to_raw(t) for t in answer.outputs],
    )
