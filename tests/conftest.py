"""Shared fixtures: the built-in sample data and a shard set written from it, made once per
test session with the real commands (no stand-ins)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.sample import SampleConfig, generate
from pipeline.shard import ShardConfig, run

SHARD_SIZE = 64  # small shards so the 300-image sample set spans several of them


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sample") / "raw"
    generate(SampleConfig(out=root))
    return root


def shard_config(src: Path, out: Path, **kw) -> ShardConfig:
    kw.setdefault("workers", 2)
    kw.setdefault("samples_per_shard", SHARD_SIZE)
    return ShardConfig(src=src, out=out, progress=False, **kw)


@pytest.fixture(scope="session")
def shard_set(sample_root, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("shards") / "out"
    manifest = run(shard_config(sample_root, out))
    return out, manifest
