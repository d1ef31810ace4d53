"""Shared fixtures: the built-in sample data and a shard set written from it, made once per
test run with the real commands (no stand-ins) and shared by every pytest-xdist worker
(tests/once.py), and the run's one Ray cluster (tests/raycluster.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline.sample import SampleConfig, generate
from pipeline.shard import run
from tests.helpers import shard_config
from tests.once import built_once, run_root
from tests.raycluster import ray_cluster, stop_cluster  # noqa: F401  (one Ray for every test of the run)

# torch.compile's C++ builds in this process rather than a pool of compile workers: on the
# suite's 2 cores, with xdist workers beside it, the pool's start-up costs more than it saves.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "sample", lambda folder: generate(SampleConfig(out=folder / "raw"))) / "raw"


@pytest.fixture(scope="session")
def shard_set(sample_root, tmp_path_factory) -> tuple[Path, dict]:
    out = built_once(tmp_path_factory, "shards", lambda folder: run(shard_config(sample_root, folder / "out"))) / "out"
    return out, json.loads((out / "manifest.json").read_text())


def pytest_sessionfinish(session) -> None:
    """In the controller (or the only process), after every worker is done: stop the run's Ray
    cluster if a test started one."""
    if hasattr(session.config, "workerinput"):
        return
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is not None and factory._basetemp is not None:
        stop_cluster(run_root(factory))


def _cuda_devices() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: skipped (never faked) where there is none.
    `@pytest.mark.gpu(2)` asks for two devices. Then the modules with the most `slow` tests
    go first, so that under xdist (`make test`: whole modules per worker) the long end-to-end
    runs start at once and the quick modules fill the other workers around them."""
    slow: dict[str, int] = {}
    for item in items:
        slow[item.module.__name__] = slow.get(item.module.__name__, 0) + bool(item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[item.module.__name__])  # stable: each module keeps its own order
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


def pytest_configure(config) -> None:
    """An xdist worker runs its in-process torch on one thread: four workers share two cores,
    and torch's OpenMP threads spin at each parallel region's barrier while a core is taken."""
    if hasattr(config, "workerinput"):
        import torch

        torch.set_num_threads(1)
