"""`python -m deploy.wait` (what the Kubernetes init containers run) really waits: it blocks
while a shard set lacks its manifest or a run folder has no registered checkpoint, returns 0
as soon as the stage's output is complete, and 1 when its timeout runs out."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

from tests.helpers import REPO, make_checkpoint, register


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "deploy.wait", *args, "--interval-s", "0.2", "--log-every-s", "1"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def still_waiting(proc: subprocess.Popen, seconds: float = 3.0) -> bool:
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return True
    return False


def waiting_says(proc: subprocess.Popen, text: str) -> str:
    """Read its output until a line holds TEXT (it has looked at least once, however slowly it
    started on a busy machine); what it said so far."""
    said = ""
    for line in proc.stdout:
        said += line
        if text in line:
            return said
    raise AssertionError(f"it ended (rc {proc.wait()}) without saying {text!r}: {said}")


def finish(proc: subprocess.Popen, said: str = "", timeout: float = 60) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, said + out


def test_waits_for_the_manifest_of_a_shard_set(shard_set, tmp_path):
    out, _ = shard_set
    partial = tmp_path / "shards"
    shutil.copytree(out, partial, ignore=shutil.ignore_patterns("manifest.json"))
    proc = start("shards", str(partial))
    try:
        said = waiting_says(proc, "waiting for shards")
        assert still_waiting(proc)  # every shard is there, but the sharder has not finished
        shutil.copy(out / "manifest.json", partial / ".manifest.tmp")
        (partial / ".manifest.tmp").rename(partial / "manifest.json")
        code, log = finish(proc, said)
    finally:
        proc.kill()
    assert code == 0, log
    assert "waiting for shards" in log and "no manifest.json" in log and "shards ready" in log


def test_a_manifest_whose_shards_are_missing_is_not_ready(shard_set, tmp_path):
    out, _ = shard_set
    partial = tmp_path / "shards"
    shutil.copytree(out, partial)
    next(partial.glob("train/*.tar")).unlink()
    proc = subprocess.run(
        [sys.executable, "-m", "deploy.wait", "shards", str(partial), "--timeout-s", "1", "--interval-s", "0.2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "is missing" in proc.stderr and "gave up" in proc.stderr


def test_waits_for_a_registered_checkpoint(shard_set, tmp_path):
    run = tmp_path / "runs" / "alexnet"
    run.mkdir(parents=True)
    proc = start("checkpoint", str(run))
    try:
        assert still_waiting(proc)
        make_checkpoint(shard_set, run / "checkpoint_000000")
        assert still_waiting(proc, 1.0)  # written, but not yet registered by Ray Train: maybe half
        register(run, "checkpoint_000000")
        code, log = finish(proc)
    finally:
        proc.kill()
    assert code == 0, log
    assert "checkpoint ready" in log


def test_gives_up_after_its_timeout(tmp_path):
    t0 = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "deploy.wait",
            "checkpoint",
            str(tmp_path / "none"),
            "--timeout-s",
            "1",
            "--interval-s",
            "0.2",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "gave up" in proc.stderr
    assert time.monotonic() - t0 < 60
