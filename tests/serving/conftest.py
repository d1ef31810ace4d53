"""The serving tests' fixtures: a checkpoint made with the model's own save function from the
sample shard set, and the real service on uvicorn on a free loopback port, plain and guarded
(a token from a file, indexing on request under one root)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import make_checkpoint
from tests.serving.helpers import DECODE_BUDGET, TOKEN, UPLOAD_LIMIT, running_server, serving_env


@pytest.fixture(scope="session")
def checkpoint(shard_set, tmp_path_factory) -> Path:
    return make_checkpoint(shard_set, tmp_path_factory.mktemp("ckpt") / "checkpoint_0001")


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
