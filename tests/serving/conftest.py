"""A checkpoint made with the model's own save function from the sample shard set, and the
real service on uvicorn on a free loopback port (a subprocess: `python -m serving`), plus
what the serving tests share (clients, images, metric readers)."""

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
import pytest
import torch
from PIL import Image

from deploy.steps import free_port
from trainer.checkpoint import save, shards_meta
from trainer.data import open_shard_set
from trainer.model import AlexNet, AlexNetConfig

REPO = Path(__file__).resolve().parents[2]
UPLOAD_LIMIT = 300_000
# The session server's decode budget: small enough that a 16-bit PNG inside the pixel limit
# and the upload limit can be over it (the default, 256 MiB, is over 40 MP of 16-bit).
DECODE_BUDGET = 32 * 1024 * 1024
CHUNK = 64 * 1024
TOKEN = "alexnet-test-token-0123"


def make_checkpoint(shard_set, folder: Path, seed: int = 0, epoch: int = 1, divide_by_std: bool = True) -> Path:
    """A checkpoint written by the trainer's own save function, with freshly initialised weights."""
    out, manifest = shard_set
    shards = open_shard_set(out)
    torch.manual_seed(seed)
    model = AlexNet(AlexNetConfig(num_classes=shards.num_classes, init="kaiming")).eval()
    save(folder, model, classes=manifest["classes"], normalization=shards.normalization(divide_by_std=divide_by_std),
         epoch=epoch, metrics={"val_top1_error": 0.9}, shards=shards_meta(out, manifest), run=folder.parent.name)
    return folder


@pytest.fixture(scope="session")
def checkpoint(shard_set, tmp_path_factory) -> Path:
    return make_checkpoint(shard_set, tmp_path_factory.mktemp("ckpt") / "checkpoint_0001")


def serving_env(**settings) -> dict:
    """This environment without any ALEXNET_* of the caller's, plus `settings` as ALEXNET_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALEXNET_")}
    env.update({f"ALEXNET_{k.upper()}": str(v) for k, v in settings.items()})
    return env


@contextmanager
def running_server(args: list[str], log: Path, env: dict | None = None, python: str = sys.executable,
                   cwd: Path = REPO):
    """`python -m serving ARGS` on a free port; yields its URL once /ready answers 200."""
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen([python, "-m", "serving", *args, "--port", str(port)], cwd=cwd,
                                env=env or serving_env(), stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
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


@pytest.fixture(scope="session")
def server(checkpoint, tmp_path_factory):
    env = serving_env(max_upload_bytes=UPLOAD_LIMIT, max_decode_bytes=DECODE_BUDGET, max_wait_ms=20)
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with running_server(["--checkpoint", str(checkpoint)], log, env) as url:
        yield url


@pytest.fixture(scope="session")
def index_roots(tmp_path_factory) -> Path:
    """An empty folder: the one root under which the guarded server indexes on request."""
    return tmp_path_factory.mktemp("index-roots")


@pytest.fixture(scope="session")
def guarded(checkpoint, index_roots, tmp_path_factory):
    """The service as an operator exposes it: a token (from a file, as a Docker or Kubernetes
    secret arrives) and indexing on request under one root. Yields (url, server log)."""
    folder = tmp_path_factory.mktemp("guarded")
    (folder / "token").write_text(TOKEN + "\n")
    (folder / "token").chmod(0o600)
    env = serving_env(token_file=folder / "token", index_roots=index_roots, max_wait_ms=20)
    with running_server(["--checkpoint", str(checkpoint)], folder / "server.log", env) as url:
        yield url, folder / "server.log"


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


def stream(url: str, ctype: str, body: Iterator[bytes], content_length: int | None = None,
           path: str = "/predict") -> tuple[int, int, bytes]:
    """POST `path` with `body` sent chunk by chunk on a raw socket (chunked transfer encoding
    unless a Content-Length is given), stopping as soon as the server answers or closes.
    -> (status, body bytes sent, response bytes)."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CHUNK)
    framing = f"Content-Length: {content_length}" if content_length is not None else "Transfer-Encoding: chunked"
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: {ctype}\r\n{framing}\r\n\r\n"
                 .encode())
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
    length = next((int(line.split(b":", 1)[1]) for line in head.lower().split(b"\r\n")
                   if line.startswith(b"content-length:")), 0)
    return len(body) >= length
