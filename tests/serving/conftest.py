"""A checkpoint made with the model's own save function from the sample shard set, and the
real service on uvicorn on a free loopback port (a subprocess: `python -m serving`)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch

from deploy.steps import free_port
from trainer.checkpoint import save, shards_meta
from trainer.data import open_shard_set
from trainer.model import AlexNet, AlexNetConfig

REPO = Path(__file__).resolve().parents[2]
UPLOAD_LIMIT = 300_000


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


@contextmanager
def running_server(args: list[str], log: Path, env: dict | None = None):
    """`python -m serving ARGS` on a free port; yields its URL once /ready answers 200."""
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "serving", *args, "--port", str(port)], cwd=REPO,
                                env=env or dict(os.environ), stdout=out, stderr=subprocess.STDOUT)
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
    env = dict(os.environ, ALEXNET_MAX_UPLOAD_BYTES=str(UPLOAD_LIMIT), ALEXNET_MAX_WAIT_MS="20")
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with running_server(["--checkpoint", str(checkpoint)], log, env) as url:
        yield url
