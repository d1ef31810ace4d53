"""What the suite builds once per test run, shared by every pytest-xdist worker process: the
sample data, the shard sets, the Ray cluster. The first worker that asks builds it under a
file lock in the run's shared temporary folder; the others wait for it and reuse it. Without
xdist the same code runs in the one process."""

from __future__ import annotations

import fcntl
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

DONE = ".built"


def run_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The temporary folder every process of this test run sees: the controller's basetemp
    (an xdist worker's own basetemp is `popen-gwN` inside it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if base.name.startswith("popen-gw") else base


@contextmanager
def locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """RUN_ROOT/shared/NAME, made by `build(folder)` in the first process that asks. A build
    that failed leaves no marker, so the next process that asks tries again from scratch."""
    folder = run_root(tmp_path_factory) / "shared" / name
    with locked(folder.parent / f"{name}.lock"):
        if not (folder / DONE).is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            build(folder)
            (folder / DONE).touch()
    return folder
