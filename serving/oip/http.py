"""The Open Inference Protocol's HTTP/REST endpoints, on the service's own FastAPI app and port.

    GET  /v2                                    server metadata
    GET  /v2/health/live, /v2/health/ready      liveness, readiness (200, or 503 until the model is loaded)
    GET  /v2/models/alexnet[/versions/V]/ready  the model is ready
    GET  /v2/models/alexnet[/versions/V]        model metadata: inputs and outputs (token)
    POST /v2/models/alexnet[/versions/V]/infer  inference (token)

The health, readiness and server-metadata endpoints are open, as /health and /ready are (they
take no input); model metadata and inference carry the bearer token like POST /predict.
Errors are the protocol's {"error": "<message>"} with the status (serving.errors).

An inference body is JSON, or JSON followed by binary tensors (Triton's binary tensor data
extension: the JSON's length in the Inference-Header-Content-Length header, each binary input
saying its size in its parameters' "binary_data_size"); outputs come back as binary data where
a requested output's parameters say "binary_data": true or the request's parameters say
"binary_data_output": true, else as JSON. The body is read like an image upload (the upload
limit, the body deadline, the body memory; serving.upload), before the request is admitted;
JSON is parsed in the decode pool (serving.admission.DecodePool), since a list of numbers
takes up to JSON_EXPANSION times its text in memory: a JSON part whose expansion would exceed
max_decode_bytes is refused (413: send the tensor as binary data).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from serving.admission import refuse_now
from serving.auth import require_token
from serving.errors import ApiError
from serving.oip import protocol
from serving.oip.protocol import InferRequest, InferResponse
from serving.oip.tensors import Tensor, check_shape, from_json, from_raw, invalid, to_json_data, to_raw
from serving.upload import read_body

HEADER_LENGTH = "Inference-Header-Content-Length"
# Python holds a JSON number as a float object in a list: 32 bytes for as little as 2 bytes
# of text ("0,").
JSON_EXPANSION = 16

public = APIRouter(prefix="/v2", tags=["Open Inference Protocol (KServe v2)"])
protected = APIRouter(prefix="/v2", tags=["Open Inference Protocol (KServe v2)"], dependencies=[Depends(require_token)])


@public.get("", summary="Server metadata")
async def server_metadata():
    return protocol.server_metadata()


@public.get("/health/live", summary="The server is live")
async def live():
    return {"live": True}


@public.get("/health/ready", summary="The server is ready (its model is loaded)")
async def ready(request: Request):
    if getattr(request.app.state, "predictor", None) is None:
        return JSONResponse({"ready": False}, status_code=503)
    return {"ready": True}


@public.get("/models/{model_name}/ready", summary="The model is ready")
@public.get("/models/{model_name}/versions/{model_version}/ready", summary="The model version is ready")
async def model_ready(request: Request, model_name: str, model_version: str = ""):
    protocol.current(request.app.state, model_name, model_version)
    return {"name": model_name, "ready": True}


@protected.get("/models/{model_name}", summary="Model metadata: inputs and outputs")
@protected.get("/models/{model_name}/versions/{model_version}", summary="Model version metadata")
async def model_metadata(request: Request, model_name: str, model_version: str = ""):
    return protocol.model_metadata(request.app.state, model_name, model_version)


@protected.post("/models/{model_name}/infer", summary="Inference: encoded images (BYTES) or preprocessed FP32")
@protected.post("/models/{model_name}/versions/{model_version}/infer", summary="Inference on a model version")
async def infer(request: Request, model_name: str, model_version: str = ""):
    state = request.app.state
    settings = state.settings
    protocol.current(state, model_name, model_version)  # an unknown model: 404 before the body is read
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding != "identity":
        raise ApiError(415, "unsupported_media_type", f"Content-Encoding {encoding} is not accepted; send it as is")
    refuse_now(state.admission, state.batcher, 1, request.headers)
    with state.bodies.share() as share:
        body = await read_body(request, settings, share, state.metrics)
        header = request.headers.get(HEADER_LENGTH)
        json_bytes = int(header) if header is not None and header.isdigit() else len(body)
        if json_bytes * JSON_EXPANSION > settings.max_decode_bytes:
            raise ApiError(
                413,
                "payload_too_large",
                f"a JSON part of {json_bytes:,} bytes is more than this server parses "
                f"({settings.max_decode_bytes // JSON_EXPANSION:,}); send tensors as binary data "
                f"({HEADER_LENGTH}, binary_data_size)",
            )
        parsed = await state.decoder.run(parse, body, header, model_name, model_version)
        answer = await protocol.infer(state, parsed.request)
    return encode(answer, parsed.binary_outputs)


@dataclass
class Parsed:
    request: InferRequest
    binary_outputs: set[str] | None  # outputs to send as binary data; None: all of them


def parse(body: bytes | bytearray, header: str | None, model_name: str, model_version: str) -> Parsed:
    """An inference body (JSON, or JSON + binary tensors) -> the request."""
    view = memoryview(body)
    if header is None:
        head, rest = view, view[:0]
    else:
        if not header.isdigit() or int(header) > len(view):
            raise invalid(f"{HEADER_LENGTH} must be the JSON part's length, at most the body's {len(view)} bytes")
        head, rest = view[: int(header)], view[int(header) :]
    try:
        doc = json.loads(bytes(head))
    except (ValueError, RecursionError):
        raise invalid("the request is not JSON (or its JSON part is not where the headers say)") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise invalid('the request must be a JSON object with a list of "inputs"')
    inputs, at = [], 0
    for spec in doc["inputs"]:
        tensor, used = _input(spec, rest[at:])
        inputs.append(tensor)
        at += used
    if at != len(rest):
        raise invalid(f"{len(rest) - at} bytes of binary data that no input claims (binary_data_size)")
    parameters = _dict(doc.get("parameters"), "parameters")
    binary: set[str] | None = None if parameters.get("binary_data_output") is True else set()
    outputs: list[str] | None = None
    if doc.get("outputs") is not None:
        if not isinstance(doc["outputs"], list):
            raise invalid('"outputs" must be a list of {"name": ...}')
        outputs = []
        for spec in doc["outputs"]:
            if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
                raise invalid('each of "outputs" must be {"name": ..., "parameters": {...}}')
            outputs.append(spec["name"])
            if binary is not None and _dict(spec.get("parameters"), "output parameters").get("binary_data") is True:
                binary.add(spec["name"])
    request_id = doc.get("id", "")
    return Parsed(
        InferRequest(
            model_name,
            model_version,
            inputs,
            outputs,
            parameters,
            request_id if isinstance(request_id, str) else str(request_id),
        ),
        binary,
    )


def _dict(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid(f"{what} must be a JSON object")
    return value


def _input(spec: Any, binary: memoryview) -> tuple[Tensor, int]:
    """One input of the JSON, its data inline or the next `binary_data_size` bytes of `binary`."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not isinstance(spec.get("datatype"), str):
        raise invalid('each input needs "name", "datatype" and "shape"')
    name, datatype = spec["name"], spec["datatype"]
    shape = check_shape(name, spec.get("shape"))
    parameters = _dict(spec.get("parameters"), f"input {name!r} parameters")
    size = parameters.get("binary_data_size")
    if size is None:
        if "data" not in spec:
            raise invalid(f"input {name!r} has neither data nor binary_data_size")
        return from_json(name, datatype, shape, spec["data"], parameters), 0
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= len(binary):
        raise invalid(f"input {name!r}: binary_data_size {size!r} is not within the {len(binary)} binary bytes left")
    return from_raw(name, datatype, shape, binary[:size]), size


def encode(answer: InferResponse, binary: set[str] | None) -> Response:
    """The response: JSON, or JSON + binary outputs (binary: their names; None: all)."""
    outputs, blobs = [], []
    for tensor in answer.outputs:
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
        if binary is None or tensor.name in binary:
            raw = to_raw(tensor)
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = to_json_data(tensor)
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": answer.model_name, "model_version": answer.model_version, "outputs": outputs}
    if answer.id:
        doc["id"] = answer.id
    head = json.dumps(doc, allow_nan=False).encode()
    if not blobs:
        return Response(head, media_type="application/json")
    return Response(
        head + b"".join(blobs), media_type="application/octet-stream", headers={HEADER_LENGTH: str(len(head))}
    )
