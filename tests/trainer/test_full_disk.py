"""Training onto a filesystem that fills up. The writer: a checkpoint that does not fit raises
OutOfSpace and leaves nothing under a checkpoint's file names. The run (real Ray, the tiny
shard set, its storage on a small real filesystem): the workers stop before the epoch whose
checkpoint would not fit, the driver says so in one line naming the path, the room and the
checkpoint to resume from (exit status 4), latest_checkpoint.json stays on the last complete
checkpoint; with room again, the same command resumes from it and finishes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from ray.train import WorkerGroupError

from pipeline.atomic import EXIT_OUT_OF_SPACE, OutOfSpace
from pipeline.transforms import Normalization
from tests.helpers import REPO, grow, small_disk
from trainer import checkpoint as ck
from trainer.failures import find_out_of_space
from trainer.model import AlexNet, AlexNetConfig


def test_a_checkpoint_that_does_not_fit_leaves_nothing_under_its_names(tmp_path):
    torch.manual_seed(0)
    model = AlexNet(AlexNetConfig(num_classes=10, input_size=67, init="kaiming"))  # ~81 MB of weights
    classes = [{"index": i, "wnid": f"n{i:08d}", "name": f"c{i}"} for i in range(10)]
    with small_disk(tmp_path / "disk", "8m") as disk:
        folder = disk / "checkpoint_epoch_0002"
        with pytest.raises(OutOfSpace, match=f"out of space writing {folder}/model.safetensors: .* free there"):
            ck.save(folder, model, classes=classes, normalization=Normalization((1.0, 2.0, 3.0)), epoch=2, metrics={})
        assert list(folder.iterdir()) == [] and ck.latest_checkpoint(disk) is None


def test_out_of_space_is_found_inside_rays_worker_group_error():
    """What trainer.run's driver gets when a worker's write fails anyway (Ray's own class)."""
    failure = WorkerGroupError("rank 1 failed", {1: OutOfSpace("/runs/r/checkpoint_epoch_0003", 1024)})
    assert str(find_out_of_space(failure)) == "out of space writing /runs/r/checkpoint_epoch_0003: 1.0 KB free there"
    assert find_out_of_space(WorkerGroupError("rank 0 failed", {0: ValueError("nan")})) is None


@pytest.mark.slow
def test_a_run_that_fills_its_disk_stops_clearly_and_resumes_once_there_is_room(ray_cluster, tiny_shard_set, tmp_path):
    data = tiny_shard_set[0]
    with small_disk(tmp_path / "disk", "250m") as disk:  # one checkpoint at 67x67 is ~155 MB: two do not fit
        run = disk / "runs" / "full"
        cmd = [sys.executable, "-m", "trainer.run", "--data", str(data), "--preset", "sample", "--input-size", "67",
               "--batch-size", "16", "--no-ten-crop-at-end", "--print-freq", "0", "--workers", "1",
               "--storage-path", str(disk / "runs"), "--name", "full", "--epochs", "3",
               "--address", ray_cluster.gcs_address]  # fmt: skip
        full = subprocess.run(cmd, cwd=REPO, env=ray_cluster.env, capture_output=True, text=True, timeout=600)
        assert full.returncode == EXIT_OUT_OF_SPACE, full.stdout[-3000:] + full.stderr[-3000:]
        (line,) = [x for x in full.stderr.splitlines() if " ERROR trainer.run: " in x]
        assert f"training stopped: out of space writing {run}: " in line and "needed" in line
        assert f"resumes from its newest complete checkpoint, {run}/checkpoint_epoch_0001 (epoch 1)" in line
        assert json.loads((run / "latest_checkpoint.json").read_text())["epoch"] == 1
        assert not (run / "checkpoint_epoch_0002").exists()

        grow(disk, "600m")
        again = subprocess.run(cmd, cwd=REPO, env=ray_cluster.env, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        assert "resuming from" in again.stdout + again.stderr and "after epoch 1" in again.stdout + again.stderr
        assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
        assert json.loads((run / "latest_checkpoint.json").read_text())["epoch"] == 3
        assert not (run / "out_of_space.json").exists()
