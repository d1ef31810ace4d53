"""The image in a request body, read within the upload limit while it streams.

Two body shapes: a raw `image/*` (or application/octet-stream) body, and multipart/form-data
with the image in the field "file". Either may come with a Content-Length or chunked. The
limit is enforced on the bytes as they arrive: a Content-Length over it is refused before
reading, and a body that passes it mid-stream is refused at that chunk; either way 413 with
`Connection: close`, so the server stops reading. Multipart is parsed here, in memory
(python-multipart's streaming parser): the file part is capped at the limit, other fields
at MAX_FORM_FIELD_BYTES, parts at MAX_FORM_PARTS; nothing is spooled to disk.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from serving.errors import ApiError
from serving.settings import MAX_FORM_FIELD_BYTES, MAX_FORM_PARTS, MULTIPART_OVERHEAD_BYTES, Settings

RAW_TYPES = ("image/", "application/octet-stream")
FILE_FIELD = b"file"


def too_large(detail: str) -> ApiError:
    return ApiError(413, "payload_too_large", detail, headers={"Connection": "close"})


async def read_image(request: Request, settings: Settings) -> bytearray:
    """The image's bytes (one buffer, filled as the body arrives: never assembled twice)."""
    limit = settings.max_upload_bytes
    ctype = request.headers.get("content-type", "")
    multipart = ctype.lower().startswith("multipart/form-data")
    if not multipart and not ctype.lower().startswith(RAW_TYPES):
        raise ApiError(415, "unsupported_media_type",
                       f"send an image as multipart/form-data (field 'file') or as a raw image/* body, "
                       f"not {ctype or 'no content type'}")
    cap = limit + MULTIPART_OVERHEAD_BYTES if multipart else limit
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > cap:
        raise too_large(f"upload of {int(length):,} bytes; the limit is {limit:,}")
    stream = _limited(request.stream(), cap, limit)
    data = await (_multipart_file(stream, ctype, limit) if multipart else _raw(stream))
    if not data:
        raise ApiError(400, "empty_body", "the request carried no image bytes")
    return data


async def _limited(stream: AsyncIterator[bytes], cap: int, limit: int) -> AsyncIterator[bytes]:
    size = 0
    async for chunk in stream:
        size += len(chunk)
        if size > cap:
            raise too_large(f"body over the limit of {limit:,} bytes")
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

    def callbacks(self) -> dict:
        return {"on_part_begin": self._part_begin, "on_header_field": self._header_field_data,
                "on_header_value": self._header_value_data, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished, "on_part_data": self._part_data}

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
