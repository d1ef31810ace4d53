"""Bounded input against the real server: the upload limit holds while a body streams, for
every body shape, and the decode memory budget is checked from the header."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from PIL import Image

from serving.settings import MULTIPART_OVERHEAD_BYTES
from tests.serving.helpers import CHUNK, UPLOAD_LIMIT, encode, jpeg, stream

OFFERED = 128 * 1024 * 1024  # what the client would send if the server kept reading
# What may be in flight when the server stops: the limit, multipart framing, and the kernel's
# socket buffers on both ends (loopback, autotuned). Far below OFFERED.
BOUND = UPLOAD_LIMIT + MULTIPART_OVERHEAD_BYTES + 24 * 1024 * 1024


def endless(prefix: bytes = b"") -> Iterator[bytes]:
    yield prefix
    for _ in range(OFFERED // CHUNK):
        yield b"\0" * CHUNK


BOUNDARY = "alexnetboundary"


def multipart_head(name: str = "file", filename: str | None = "x.jpg") -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return (f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\nContent-Type: image/jpeg\r\n\r\n".encode()) + jpeg()


MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


@pytest.mark.parametrize("shape", ["chunked raw", "chunked multipart", "chunked multipart form field"])
def test_a_streamed_body_over_the_limit_gets_413_and_the_server_stops_reading(server, shape):
    ctype, prefix = {
        "chunked raw": ("image/jpeg", jpeg()),
        "chunked multipart": (MULTIPART, multipart_head()),
        "chunked multipart form field": (MULTIPART, multipart_head("note", None)),
    }[shape]
    status, sent, response = stream(server, ctype, endless(prefix))
    assert status == 413, response
    assert b"payload_too_large" in response and b"connection: close" in response.lower()
    assert sent < BOUND, f"{sent:,} bytes went in before the server stopped reading"
    assert httpx.get(f"{server}/health").status_code == 200


def test_a_multipart_content_length_over_the_limit_is_refused_before_reading(server):
    status, sent, _ = stream(server, MULTIPART, endless(multipart_head()), content_length=OFFERED)
    assert status == 413 and sent < BOUND


def test_multipart_within_the_limit_and_too_many_parts(server):
    image = jpeg()
    ok = httpx.post(
        f"{server}/predict", files={"file": ("x.jpg", image, "image/jpeg")}, data={"note": "hello"}, timeout=60
    )
    assert ok.status_code == 200, ok.text
    # A file part just over the limit, inside a body the framing allowance would still admit.
    over = httpx.post(
        f"{server}/predict", files={"file": ("x.jpg", image + bytes(UPLOAD_LIMIT), "image/jpeg")}, timeout=60
    )
    assert over.status_code == 413 and over.json()["error"] == "payload_too_large"
    many = httpx.post(
        f"{server}/predict",
        files={"file": ("x.jpg", image, "image/jpeg")},
        data={f"f{i}": "x" for i in range(20)},
        timeout=60,
    )
    assert many.status_code == 413 and "parts" in many.json()["detail"]


def png16(side: int) -> bytes:
    ramp = (np.arange(side * side, dtype=np.uint32) % 65536).astype(np.uint16).reshape(side, side)
    return encode(Image.fromarray(ramp), "PNG")


def test_decode_budget_from_the_header(server):
    """A 16-bit PNG of 4000x4000 is ~100 KB on the wire and estimated at 64 MB to decode
    (16 MP x 4 bytes): refused from its header, over the server's 32 MiB budget. One of
    1500x1500 (9 MB) is within it and answered."""
    big = png16(4000)
    assert len(big) < UPLOAD_LIMIT
    r = httpx.post(f"{server}/predict", content=big, headers={"content-type": "image/png"}, timeout=60)
    assert r.status_code == 413 and r.json()["error"] == "over_budget", r.text
    assert "MiB" in r.json()["detail"]
    small = httpx.post(f"{server}/predict", content=png16(1500), headers={"content-type": "image/png"}, timeout=60)
    assert small.status_code == 200, small.text
