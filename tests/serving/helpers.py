"""What the serving tests share: the real service on uvicorn on a free loopback port (a
subprocess: `python -m serving`), its settings as the environment, images, a raw-socket
streaming client and a /metrics reader."""

from __future__ import annotations

import io
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from PIL import Image

from deploy.steps import free_port
from tests.helpers import REPO

UPLOAD_LIMIT = 300_000


# The session server's decode budget: small enough that a 16-bit PNG inside the pixel limit
# and the upload limit can be over it (the default, 256 MiB, is over 40 MP of 16-bit).
DECODE_BUDGET = 32 * 1024 * 1024


CHUNK = 64 * 1024


TOKEN = "alexnet-test-token-0123"


def serving_env(**settings) -> dict:
    """This environment without any ALEXNET_* of the caller's, plus `settings` as ALEXNET_*.
    The answer deadline is 120 s unless a test sets its own: the suite's servers share two
    cores with trainings and other servers, where a forward pass can outlast the default 10 s."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALEXNET_")}
    env.update({f"ALEXNET_{k.upper()}": str(v) for k, v in {"request_timeout_s": 120, **settings}.items()})
    return env


@contextmanager
def running_server(args: list[str], log: Path, env: dict | None = None, python: str = sys.executable, cwd: Path = REPO):
    """`python -m serving ARGS` on a free port; yields its URL once /ready answers 200. Its gRPC
    server gets a free port too, unless ARGS name one (--grpc-port) or turn it off (--no-grpc)."""
    port = free_port()
    if "--grpc-port" not in args and "--no-grpc" not in args:
        args = [*args, "--grpc-port", str(free_port())]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [python, "-m", "serving", *args, "--port", str(port)],
            cwd=cwd,
            env=env or serving_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # --backend onnxruntime exports at load: minutes on a busy 2-core machine
        while True:
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not come up: {log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


AUTH = {"authorization": f"Bearer {TOKEN}"}


def jpeg(size=(320, 240), colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def metric(url: str, name: str, labels: str = "") -> float:
    """The value of one sample on /metrics (`labels` as written there, e.g. 'reason="deadline"')."""
    prefix = f"{name}{{{labels}}} " if labels else f"{name} "
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return float(next(line.rsplit(" ", 1)[1] for line in text.splitlines() if line.startswith(prefix)))


def stream(
    url: str, ctype: str, body: Iterator[bytes], content_length: int | None = None, path: str = "/predict"
) -> tuple[int, int, bytes]:
    """POST `path` with `body` sent chunk by chunk on a raw socket (chunked transfer encoding
    unless a Content-Length is given), stopping as soon as the server answers or closes.
    -> (status, body bytes sent, response bytes)."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CHUNK)
    framing = f"Content-Length: {content_length}" if content_length is not None else "Transfer-Encoding: chunked"
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: {ctype}\r\n{framing}\r\n\r\n".encode())
    sent = 0
    try:
        for chunk in body:
            if select.select([sock], [], [], 0)[0]:  # an answer (or a close) already
                break
            try:
                sock.sendall(chunk if content_length is not None else b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        else:
            if content_length is None:
                sock.sendall(b"0\r\n\r\n")
        response = b""
        while not _complete(response):
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            response += data
    finally:
        sock.close()
    assert response.startswith(b"HTTP/1.1 "), (sent, response[:200])
    return int(response.split(b" ", 2)[1]), sent, response


def _complete(response: bytes) -> bool:
    head, sep, body = response.partition(b"\r\n\r\n")
    if not sep:
        return False
    length = next(
        (int(line.split(b":", 1)[1]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")), 0
    )
    return len(body) >= length
