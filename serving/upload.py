"""The image in a request body, read within the upload limit, the body deadline and the
memory all bodies may hold, while it streams.

Two body shapes: a raw `image/*` (or application/octet-stream) body, and multipart/form-data
with the image in the field "file". Either may come with a Content-Length or chunked. The
limit is enforced on the bytes as they arrive: a Content-Length over it is refused before
reading, and a body that passes it mid-stream is refused at that chunk; either way 413 with
`Connection: close`, so the server stops reading. Multipart is parsed here, in memory
(python-multipart's streaming parser): the file part is capped at the limit, other fields
at MAX_FORM_FIELD_BYTES, parts at MAX_FORM_PARTS; nothing is spooled to disk.

The whole body must arrive within `body_timeout_s` (from when the app starts reading it,
right after the headers): else 408 and `Connection: close` (alexnet_dropped_connections_total
{reason="body_timeout"}). `BodyMemory` bounds what all bodies hold together
(`max_body_memory_bytes`): each request takes its bytes as they arrive and gives them back
when it is answered; a chunk that does not fit gets 503 + Retry-After at once and the
connection closed. Bytes are taken as they arrive, not as a Content-Length promises them, so
a client that announces a large body and sends it slowly holds next to nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from serving.errors import ApiError
from serving.metrics import Metrics
from serving.settings import MAX_FORM_FIELD_BYTES, MAX_FORM_PARTS, MULTIPART_OVERHEAD_BYTES, Settings

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

RAW_TYPES = ("image/", "application/octet-stream")
FILE_FIELD = b"file"


def too_large(detail: str) -> ApiError:
    return ApiError(413, "payload_too_large", detail, headers={"Connection": "close"})


class BodyMemory:
    """The bytes of request bodies held in memory at once, all requests together."""

    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings, self.metrics = settings, metrics
        self.held = 0

    @contextmanager
    def share(self) -> Iterator[BodyShare]:
        """One request's share, given back when the block exits (the request is answered)."""
        share = BodyShare(self)
        try:
            yield share
        finally:
            self._add(-share.bytes)

    def _add(self, n: int) -> None:
        self.held += n
        self.metrics.body_bytes.set(self.held)


class BodyShare:
    def __init__(self, memory: BodyMemory):
        self.memory, self.bytes = memory, 0

    def take(self, n: int) -> None:
        memory = self.memory
        if memory.held + n > memory.settings.max_body_memory_bytes:
            memory.metrics.rejected.labels("body_memory").inc()
            raise ApiError(
                503,
                "overloaded",
                f"the server holds {memory.held:,} bytes of uploads, the most it takes "
                "at once; retry after the Retry-After seconds",
                headers={"Retry-After": str(memory.settings.retry_after_s), "Connection": "close"},
            )
        memory._add(n)
        self.bytes += n


async def read_image(request: Request, settings: Settings, share: BodyShare, metrics: Metrics) -> bytearray:
    """The image's bytes (one buffer, filled as the body arrives: never assembled twice),
    within the upload limit, the body deadline and the body memory."""
    limit = settings.max_upload_bytes
    ctype = request.headers.get("content-type", "")
    multipart = ctype.lower().startswith("multipart/form-data")
    if not multipart and not ctype.lower().startswith(RAW_TYPES):
        raise ApiError(
            415,
            "unsupported_media_type",
            f"send an image as multipart/form-data (field 'file') or as a raw image/* body, "
            f"not {ctype or 'no content type'}",
        )
    cap = limit + MULTIPART_OVERHEAD_BYTES if multipart else limit
    stream = _limited(_announced(request, cap, limit), cap, limit, share)
    data = await _in_time(_multipart_file(stream, ctype, limit) if multipart else _raw(stream), settings, metrics)
    if not data:
        raise ApiError(400, "empty_body", "the request carried no image bytes")
    return data


async def read_body(request: Request, settings: Settings, share: BodyShare, metrics: Metrics) -> bytearray:
    """A whole body of any type (an Open Inference Protocol request: JSON, or JSON followed by
    binary tensors), within the upload limit, the body deadline and the body memory."""
    limit = settings.max_upload_bytes
    return await _in_time(_raw(_limited(_announced(request, limit, limit), limit, limit, share)), settings, metrics)


def _announced(request: Request, cap: int, limit: int) -> AsyncIterator[bytes]:
    """The body's stream, once its Content-Length (if any) is within `cap`."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > cap:
        raise too_large(f"upload of {int(length):,} bytes; the limit is {limit:,}")
    return request.stream()


async def _in_time(reading: Awaitable[bytearray], settings: Settings, metrics: Metrics) -> bytearray:
    try:
        return await asyncio.wait_for(reading, settings.body_timeout_s)
    except asyncio.TimeoutError:
        metrics.dropped_connections.labels("body_timeout").inc()
        raise ApiError(
            408,
            "request_timeout",
            f"the request's body did not arrive within {settings.body_timeout_s:g} s",
            headers={"Connection": "close"},
        ) from None


async def _limited(stream: AsyncIterator[bytes], cap: int, limit: int, share: BodyShare) -> AsyncIterator[bytes]:
    size = 0
    async for chunk in stream:
        size += len(chunk)
        if size > cap:
            raise too_large(f"body over the limit of {limit:,} bytes")
        share.take(len(chunk))
        yield chunk


async def _raw(stream: AsyncIterator[bytes]) -> bytearray:
    data = bytearray()
    async for chunk in stream:
        data += chunk
    return data


async def _multipart_file(stream: AsyncIterator[bytes], ctype: str, limit: int) -> bytearray:
    _, options = parse_options_header(ctype)
    boundary = options.get(b"boundary")
    if not boundary:
        raise ApiError(400, "invalid_multipart", "multipart/form-data without a boundary")
    form = _FormState(limit)
    parser = MultipartParser(boundary, form.callbacks())
    try:
        async for chunk in stream:
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise ApiError(400, "invalid_multipart", f"malformed multipart body: {exc}") from None
    if form.file is None:
        raise ApiError(400, "missing_file", 'multipart upload needs a file in the field "file"')
    return form.file


class _FormState:
    """python-multipart callbacks: keep the "file" part's bytes (within the limit), count the rest."""

    def __init__(self, limit: int):
        self.limit = limit
        self.parts = 0
        self.file: bytearray | None = None
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._target: bytearray | None = None  # the file being filled, or None for another field
        self._field_size = 0

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field_data,
            "on_header_value": self._header_value_data,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
        }

    def _part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_FORM_PARTS:
            raise too_large(f"more than {MAX_FORM_PARTS} parts in the multipart body")
        self._headers, self._target, self._field_size = {}, None, 0

    def _header_field_data(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[bytes(self._header_field).lower()] = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if options.get(b"name") == FILE_FIELD and b"filename" in options:
            if self.file is not None:
                raise ApiError(400, "too_many_files", 'send one file, in the field "file"')
            self.file = self._target = bytearray()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        n = end - start
        if self._target is not None:
            if len(self._target) + n > self.limit:
                raise too_large(f"file over the limit of {self.limit:,} bytes")
            self._target += data[start:end]
            return
        self._field_size += n
        if self._field_size > MAX_FORM_FIELD_BYTES:
            raise too_large(f"a form field over {MAX_FORM_FIELD_BYTES:,} bytes (only the image may be large)")
