"""kill -9 at any moment, rerun, and the shard set is byte-identical to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.shard import run
from tests.helpers import REPO, shard_config, tree_bytes

SMALL_SHARDS = 16  # many shards, so kills land between, inside and after shard writes


def shard_cmd(src: Path, out: Path) -> list[str]:
    # fmt: off
    return [sys.executable, "-m", "pipeline.shard", "--src", str(src), "--out", str(out),
            "--shard-size", str(SMALL_SHARDS), "--workers", "2", "--quiet"]
    # fmt: on


def kill_when(cmd: list[str], condition: Callable[[], bool], timeout: float = 60.0) -> bool:
    """Start the sharder in its own process group and SIGKILL the whole group (the parent
    and its worker processes, like a crashed machine) as soon as `condition()` holds.
    True if it was killed before it finished."""
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if condition():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.002)
    proc.wait()
    return False


def records(out: Path) -> int:
    return len(list((out / ".state").rglob("*.json")))


def test_kill_9_then_rerun_is_byte_identical(sample_root, tmp_path):
    reference = tmp_path / "reference"
    run(shard_config(sample_root, reference, samples_per_shard=SMALL_SHARDS))

    out = tmp_path / "interrupted"
    cmd = shard_cmd(sample_root, out)
    # 1: in the middle of writing a tar (a temporary file exists).
    assert kill_when(cmd, lambda: any((out / "train").glob(".*.tmp")) if (out / "train").is_dir() else False)
    assert not (out / "manifest.json").exists()
    # 2 and 3: right after a shard completes, twice, each run resuming the previous one.
    for _ in range(2):
        start = records(out)
        assert kill_when(cmd, lambda start=start: records(out) > start + 1)
        assert not (out / "manifest.json").exists()  # killed mid-run: never looks complete
    kept = records(out)
    assert 0 < kept < len(list((reference / ".state").rglob("*.json")))

    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"({kept} shard(s) already complete and kept)" in result.stderr
    assert tree_bytes(out) == tree_bytes(reference)
