"""A service started on a run folder with --watch-s switches to each newer checkpoint the
trainer points latest_checkpoint.json at, without a restart (the Open Inference Protocol's model
version follows it), and refuses one whose preprocessing differs. Real
uvicorn, real checkpoints written by the trainer's save function."""

from __future__ import annotations

import time

import httpx

from tests.helpers import make_checkpoint, register
from tests.serving.helpers import running_server


def serving_epoch(url: str) -> int:
    return httpx.get(f"{url}/ready", timeout=5).json()["checkpoint"]["epoch"]


def wait_for_epoch(url: str, epoch: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while serving_epoch(url) != epoch:
        assert time.monotonic() < deadline, f"still serving epoch {serving_epoch(url)}, not {epoch}"
        time.sleep(0.2)


def v2_versions(url: str) -> list[str]:
    return httpx.get(f"{url}/v2/models/alexnet", timeout=5).json()["versions"]


def predict(url: str, image: bytes) -> dict:
    r = httpx.post(f"{url}/predict", files={"file": ("q.jpg", image, "image/jpeg")}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_switches_to_newer_checkpoints_and_skips_incompatible_ones(shard_set, sample_root, tmp_path):
    run = tmp_path / "runs" / "demo"
    make_checkpoint(shard_set, run / "checkpoint_000001", seed=0, epoch=1)
    register(run, "checkpoint_000001")
    image = sorted((sample_root / "val").rglob("*.JPEG"))[-1].read_bytes()
    with running_server(["--checkpoint", str(run), "--watch-s", "0.2"], tmp_path / "server.log") as url:
        first = predict(url, image)
        assert first["checkpoint"]["epoch"] == 1
        assert v2_versions(url) == ["1"]  # the Open Inference Protocol's model version: the epoch

        # Training writes epoch 2; once registered, the service moves to it by itself.
        make_checkpoint(shard_set, run / "checkpoint_000002", seed=1, epoch=2)
        time.sleep(1)
        assert serving_epoch(url) == 1  # written but not registered: possibly half-written, not trusted
        register(run, "checkpoint_000001", "checkpoint_000002")
        wait_for_epoch(url, 2)
        second = predict(url, image)
        assert second["checkpoint"]["epoch"] == 2
        assert v2_versions(url) == ["2"]
        assert httpx.get(f"{url}/v2/models/alexnet/versions/1/ready").status_code == 404  # gone with its checkpoint
        assert second["predictions"] != first["predictions"]  # really the other weights

        # A checkpoint whose normalisation differs would misread requests in flight: refused.
        make_checkpoint(shard_set, run / "checkpoint_000003", seed=2, epoch=3, divide_by_std=False)
        register(run, "checkpoint_000002", "checkpoint_000003")
        deadline = time.monotonic() + 60  # the watcher has seen it once it says so
        while "not switching to" not in (tmp_path / "server.log").read_text():
            assert time.monotonic() < deadline, "the watcher never judged checkpoint_000003"
            time.sleep(0.2)
        assert serving_epoch(url) == 2
        assert predict(url, image)["checkpoint"]["epoch"] == 2
        metrics = httpx.get(f"{url}/metrics").text
        assert "alexnet_checkpoint_reloads_total 1.0" in metrics
    log = (tmp_path / "server.log").read_text()
    assert "now serving" in log and "not switching to" in log and "preprocessing differ" in log
