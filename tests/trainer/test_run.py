"""Training with real Ray on the CPU on the sample shards: `python -m trainer.run` through `ray
job submit`, stopped with `ray job stop` and resubmitted, a worker of the resubmitted job
killed and replaced, on small inputs (67x67, the smallest the layer arithmetic allows) so that
each epoch takes seconds, and the run's TensorBoard event files read back; setup errors. Exact
resume and the rest: test_resume.py."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.raycluster import VENV_BIN
from tests.trainer.helpers import assert_progress_without_ray_spam, run_main_each
from trainer.checkpoint import latest_checkpoint, read_meta

pytestmark = pytest.mark.slow


def train_cmd(data: Path, storage: Path, name: str, *extra: str) -> list[str]:
    # fmt: off
    return [sys.executable, "-m", "trainer.run", "--data", str(data), "--preset", "sample", "--workers", "2",
            "--input-size", "67", "--batch-size", "16", "--storage-path", str(storage), "--name", name, *extra]
    # fmt: on


def metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def resumed_after(logs: str) -> list[int]:
    """The epochs each "resuming from" line of a run's log names, in order."""
    return [int(e) for e in re.findall(r"resuming from .* after epoch (\d+)", logs)]


def wait_for(condition, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def job(ray_cluster, shard_set, tmp_path_factory) -> dict:
    """ray start --head (the session fixture) + ray job submit + a job stop + resubmit; while
    the resubmitted job trains, its rank 1 is killed (SIGKILL) once it has saved an epoch of
    its own: Ray Train replaces the worker and the run resumes from that checkpoint."""
    from ray.job_submission import JobSubmissionClient

    data, _ = shard_set
    storage = tmp_path_factory.mktemp("runs")
    run = storage / "jobrun"
    # Epochs of a few seconds: enough of them that the stop after the first lands mid-run,
    # and the kill after the resubmission's first epoch lands before the last one ends.
    entry = train_cmd(data, storage, "jobrun", "--epochs", "5", "--print-freq", "5")
    submit = [str(VENV_BIN / "ray"), "job", "submit", "--address", ray_cluster.dashboard_url]
    r = ray_cluster.ray(*submit[1:], "--no-wait", "--", *entry)
    job_id = re.search(r"raysubmit_\w+", r.stdout + r.stderr).group(0)
    jobs = JobSubmissionClient(ray_cluster.dashboard_url)  # what `ray job stop` calls, without its CLI's start-up:
    wait_for(lambda: len(metrics(run)) >= 1 and latest_checkpoint(run), 400, "the first epoch's checkpoint")
    assert jobs.stop_job(job_id)  # the stop lands within a second of the first checkpoint, mid-run
    wait_for(lambda: jobs.get_job_status(job_id).is_terminal(), 120, "the stopped job's exit")
    status = ray_cluster.ray("job", "status", "--address", ray_cluster.dashboard_url, job_id, check=False)
    done_before = len(metrics(run))
    assert done_before <= 3, "the stop landed too late to leave epochs for the kill"

    # Blocking this time, same name + storage; its logs are the submit command's output.
    again_id = f"{job_id}-again"
    again = subprocess.Popen(
        [*submit, "--submission-id", again_id, "--", *entry],
        env=ray_cluster.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # (read now: retention may delete that checkpoint by the end of the run)
        saved = wait_for(
            lambda: (c := latest_checkpoint(run)) and (e := read_meta(c).epoch) > done_before and e,
            400,
            "a checkpoint of the resubmitted job",
            again,
        )
        victim = json.loads((run / ".workers" / "rank1.json").read_text())["pid"]
        os.kill(victim, signal.SIGKILL)  # in the epoch after `saved`, before the run's last ends
        logs = again.communicate(timeout=900)[0]
    finally:
        if again.poll() is None:  # a failure above: neither the command nor its job left running
            again.kill()
            jobs.stop_job(again_id)
    return {
        "run": run,
        "status": status.stdout + status.stderr,
        "done_before": done_before,
        "rc": again.returncode,
        "logs": logs,
        "saved": saved,
        "victim": victim,
    }


def test_job_submit_stop_and_resubmit_resumes_to_the_same_epoch_count(job):
    assert "stopped" in job["status"].lower()
    assert job["rc"] == 0, job["logs"][-3000:]
    logs = job["logs"]
    assert 1 <= resumed_after(logs)[0] <= job["done_before"], logs[-3000:]
    assert_progress_without_ray_spam(logs, epochs=5)
    run = job["run"]

    rows = metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]  # the same epoch count, each epoch once
    final = rows[-1]
    # Above chance (10 classes: 90% top-1 error) by a wide margin on the 99 val images.
    assert final["val_top1_error"] < 0.8, rows
    assert final["val_images"] == 99 and final["train_images"] == 297
    assert {"lr", "images_per_s", "data_wait_share", "val_top5_error", "val10crop_top1_error"} <= set(final)
    config = json.loads((run / "config.json").read_text())
    assert config["recipe"]["name"] == "sample" and config["runtime"]["workers"] == 2
    assert config["recipe"]["epochs"] == 5
    ckpt = latest_checkpoint(run)
    assert {p.name for p in ckpt.iterdir()} >= {
        "model.safetensors",
        "model.json",
        "train_state.pt",
        "rank_state_0.pt",
        "rank_state_1.pt",
    }
    assert read_meta(ckpt).epoch == 5
    png = run / "learning_curves.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert_tensorboard_has_every_epoch(run, rows, steps_per_epoch=19)  # ceil((297 // 2) / 8)


def test_a_killed_worker_is_replaced_and_training_resumes(job):
    """The resubmitted job's rank 1, killed after the job saved an epoch of its own: a new
    worker takes its place and the run resumes from that checkpoint, each epoch once."""
    logs, run = job["logs"], job["run"]
    assert job["rc"] == 0, logs[-3000:]
    # the resubmission's resume, then the one(s) after the kill, from the checkpoint it had saved
    resumes = resumed_after(logs)
    assert len(resumes) >= 2 and min(resumes[1:]) >= job["saved"], logs[-3000:]
    assert json.loads((run / ".workers" / "rank1.json").read_text())["pid"] != job["victim"]  # a new worker
    assert [r["epoch"] for r in metrics(run)] == [1, 2, 3, 4, 5]


def assert_tensorboard_has_every_epoch(run: Path, rows: list[dict], steps_per_epoch: int) -> None:
    """The run's event files, read back with TensorBoard's own reader, after a stop and a
    resume: each per-epoch scalar once per epoch with metrics.jsonl's value, the progress
    lines' scalars in every epoch, the end-of-run images."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from trainer.board import CONV1_KERNELS, EPOCH_SCALARS, LEARNING_CURVES, STEP_IMAGES_PER_S, STEP_LOSS, STEPS_DIR

    def read(folder: Path) -> EventAccumulator:
        acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
        acc.Reload()
        return acc

    epochs = read(run)
    expected = {tag: [(r["epoch"], r[key]) for r in rows if key in r] for key, tag in EPOCH_SCALARS.items()}
    expected = {tag: points for tag, points in expected.items() if points}
    assert {"train/loss", "val/top1_error", "val10crop/top5_error", "lr", "throughput/data_wait_share"} <= set(expected)
    assert sorted(epochs.Tags()["scalars"]) == sorted(expected)
    for tag, points in expected.items():
        found = [(p.step, p.value) for p in epochs.Scalars(tag)]
        assert [s for s, _ in found] == [s for s, _ in points], tag  # each epoch once, in order
        assert [v for _, v in found] == pytest.approx([v for _, v in points], rel=1e-6), tag
    assert [i.step for i in epochs.Images(CONV1_KERNELS)] == [5] and epochs.Images(LEARNING_CURVES)
    steps = read(run / STEPS_DIR)
    for tag in (STEP_LOSS, STEP_IMAGES_PER_S):
        at = [p.step for p in steps.Scalars(tag)]
        assert at == sorted(set(at)), tag
        assert {(s - 1) // steps_per_epoch + 1 for s in at} == {1, 2, 3, 4, 5}, (tag, at)  # every epoch


def test_setup_errors_are_clear(ray_cluster, shard_set, tmp_path):
    """Each refusal: exit status 2 and its reason on stderr, the first through `python -m
    trainer.run` itself, the rest through its main() one after another in one process."""
    data, _ = shard_set
    r = subprocess.run(
        [sys.executable, "-m", "trainer.run", "--storage-path", str(tmp_path), "--data", str(tmp_path / "nope")],
        cwd=tmp_path,
        env=ray_cluster.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "does not exist" in r.stderr
    # A submission the cluster refuses changes nothing in the run folder: --fresh deletes
    # nothing, and an --allow-changes config is not recorded as if it had been trained.
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "config.json").write_text('{"lr": 0.5}')
    gcs = ["--address", ray_cluster.gcs_address]
    kept = ["--name", "kept", "--workers", "2", "--gpus-per-worker", "2"]
    cases = [
        (["--data", str(data), "--input-size", "299"], 2, "does not fit"),
        (["--data", str(data), "--workers", "3"], 2, "must split evenly over 3 worker(s)"),
        (["--data", str(data), "--workers", "512", "--batch-size", "512"], 2, "more than the 297 train samples"),
        (["--data", str(data), "--resume", str(tmp_path / "nothing")], 2, "--resume"),
        (
            ["--data", str(data), "--workers", "2", "--gpus-per-worker", "2", *gcs],
            2,
            "requested, but the Ray cluster has 0",
        ),
        (["--data", str(data), *kept, "--fresh", *gcs], 2, "requested, but the Ray cluster has 0"),
        (["--data", str(data), *kept, "--allow-changes", *gcs], 2, "requested, but the Ray cluster has 0"),
        (["--help"], 0, "--gpus-per-worker"),
    ]
    returned = run_main_each(
        [["--storage-path", str(tmp_path), *argv] for argv, _, _ in cases], ray_cluster.env, tmp_path
    )
    for (argv, rc, reason), r in zip(cases, returned):
        assert r.returncode == rc and reason in (r.stdout if rc == 0 else r.stderr), (
            argv,
            r.returncode,
            r.stderr[-2000:],
        )
    assert (tmp_path / "kept" / "config.json").read_text() == '{"lr": 0.5}'
