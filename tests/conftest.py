"""Shared fixtures: the built-in sample data and a shard set written from it, made once per
test session with the real commands (no stand-ins)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.sample import SampleConfig, generate
from pipeline.shard import run
from tests.helpers import shard_config
from tests.raycluster import ray_cluster  # noqa: F401  (a session fixture: one Ray for every test)


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sample") / "raw"
    generate(SampleConfig(out=root))
    return root


@pytest.fixture(scope="session")
def shard_set(sample_root, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("shards") / "out"
    manifest = run(shard_config(sample_root, out))
    return out, manifest


def _cuda_devices() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: skipped (never faked) where there is none.
    `@pytest.mark.gpu(2)` asks for two devices."""
    available = None
    for item in items:
        marker = item.get_closest_marker("gpu")
        if marker is None:
            continue
        if available is None:
            available = _cuda_devices()
        needed = marker.args[0] if marker.args else 1
        if available < needed:
            item.add_marker(pytest.mark.skip(reason=f"needs {needed} CUDA device(s), found {available}"))
