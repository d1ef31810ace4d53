"""Exact resume (DALI with 1 and 2 workers, the webdataset back-end with 1), the config-change
refusal, the divergence guard, a killed worker, --resume and evaluation, with real Ray Train
runs (the session's cluster) on tiny settings: 67x67 inputs (the smallest the layer
arithmetic allows), a global batch of 16, the tiny shard set (one shard per split: two
workers split its samples)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import REPO
from trainer.checkpoint import latest_checkpoint, read_meta
from trainer.config import TrainConfig, with_preset
from trainer.run import TrainSetupError, fit

pytestmark = pytest.mark.slow


def tiny(data: Path, storage: Path, name: str, **kw) -> TrainConfig:
    """The runs' config as TrainConfig (for the checks fit() makes before Ray is involved)."""
    kw = {"epochs": 3, "batch_size": 16, **kw}
    base = TrainConfig(data=str(data), preset="sample", name=name, storage_path=str(storage), input_size=67,
                       ten_crop_at_end=False, print_freq=0)
    overrides = {k: kw.pop(k) for k in list(kw) if k in ("epochs", "batch_size", "lr", "momentum")}
    return replace(with_preset(base, overrides), **kw)


def start(cluster, data: Path, storage: Path, name: str, *args: str) -> subprocess.Popen:
    """`python -m trainer.run` with the tiny settings, as its own Ray driver on the cluster."""
    cmd = [sys.executable, "-m", "trainer.run", "--data", str(data), "--preset", "sample", "--input-size", "67",
           "--batch-size", "16", "--no-ten-crop-at-end", "--print-freq", "0", "--storage-path", str(storage),
           "--name", name, "--address", cluster.gcs_address, *args]
    return subprocess.Popen(cmd, cwd=REPO, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def together(*procs: subprocess.Popen) -> list[tuple[int, str]]:
    """Wait for runs started side by side (the cluster has CPUs for eight tiny workers)."""
    out = [p.communicate(timeout=900)[0] for p in procs]
    return [(p.returncode, o) for p, o in zip(procs, out)]


def final_state(run: Path) -> dict:
    ckpt = latest_checkpoint(run)
    assert ckpt is not None, f"no checkpoint in {run}"
    return {"epoch": read_meta(ckpt)["epoch"], "weights": load_file(str(ckpt / "model.safetensors")),
            "shared": torch.load(ckpt / "train_state.pt", weights_only=True),
            "ranks": {p.name: torch.load(p, weights_only=True) for p in sorted(ckpt.glob("rank_state_*.pt"))},
            "metrics": [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]}


def identical(a, b) -> bool:
    """Bitwise equality of nested checkpoint content."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(identical(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture(scope="module")
def runs(ray_cluster, tiny_shard_set, shard_set, tmp_path_factory):
    """For DALI with 1 and 2 workers and webdataset with 1: an uninterrupted 3-epoch run, and the
    same run stopped after epoch 2 and resubmitted to epoch 3. Then, from the first round's
    runs: a run the divergence guard stops, a new run continuing another's checkpoint with a
    changed lr (--resume, --allow-changes), and a 2-worker run on the full sample set whose
    rank 1 is killed after epoch 1 (its epochs last long enough for the kill to land mid-run).
    Independent runs go side by side, in two rounds (8 workers at most: the cluster's CPUs)."""
    storage = tmp_path_factory.mktemp("runs")
    data = tiny_shard_set[0]
    s1, s2, wds = storage / "w1", storage / "w2", storage / "wds"
    where = {1: s1, 2: s2, "wds": wds}

    def run(w: int | str, name: str, *args: str, shards: Path = data) -> subprocess.Popen:
        loader = ("--loader", "webdataset", "--loader-threads", "1") if w == "wds" else ("--loader", "dali")
        workers = "1" if w == "wds" else str(w)
        return start(ray_cluster, shards, where[w], name, "--workers", workers, *loader, *args)

    first = together(run(1, "straight", "--epochs", "3"), run(1, "stopped", "--epochs", "2"),
                     run(2, "straight", "--epochs", "3"), run(2, "stopped", "--epochs", "2"),
                     run("wds", "straight", "--epochs", "3"), run("wds", "stopped", "--epochs", "2"))
    assert all(rc == 0 for rc, _ in first), first
    after_2 = {w: final_state(where[w] / "stopped") for w in where}
    straight = {w: final_state(where[w] / "straight") for w in where}
    killed_run = run(2, "killed", "--epochs", "4", "--print-freq", "5", shards=shard_set[0])
    procs = [run(1, "stopped", "--epochs", "3"), run(2, "stopped", "--epochs", "3"),
             run(1, "straight", "--epochs", "5", "--lr", "30", "--print-freq", "2", "--allow-changes"),
             run(1, "other", "--epochs", "4", "--resume", str(s1 / "straight" / "checkpoint_epoch_0003"), "--lr",
                 "0.001", "--allow-changes"),
             killed_run, run("wds", "stopped", "--epochs", "3")]
    killed = s2 / "killed"
    deadline = time.monotonic() + 600
    while latest_checkpoint(killed) is None:  # then kill rank 1 in epoch 2
        # watch the killed run itself: the others may well end before it saves epoch 1
        assert time.monotonic() < deadline and killed_run.poll() is None, "the killed run never saved epoch 1"
        time.sleep(0.5)
    victim = json.loads((killed / ".workers" / "rank1.json").read_text())["pid"]
    os.kill(victim, signal.SIGKILL)
    second = together(*procs)
    assert [rc for rc, _ in second] == [0, 0, 3, 0, 0, 0], second
    return {"data": data, "manifest": tiny_shard_set[1], "storage": where, "straight": straight,
            "after_2": after_2, "resumed": {w: final_state(where[w] / "stopped") for w in where},
            "victim": victim, "logs": {"diverged": second[2][1], "other": second[3][1], "killed": second[4][1]}}


@pytest.fixture(params=[1, 2, "wds"], ids=["dali-1-worker", "dali-2-workers", "webdataset-1-worker"])
def workers(request) -> int | str:
    return request.param


def test_a_stopped_and_resumed_run_ends_bitwise_equal_to_an_uninterrupted_one(runs, workers):
    straight, resumed = runs["straight"][workers], runs["resumed"][workers]
    assert runs["after_2"][workers]["epoch"] == 2 and straight["epoch"] == resumed["epoch"] == 3
    assert identical(straight["weights"], resumed["weights"])
    assert identical(straight["shared"]["optimizer"], resumed["shared"]["optimizer"])  # momentum too
    assert identical(straight["shared"]["scheduler"], resumed["shared"]["scheduler"])
    # every epoch's numbers, the resumed epoch 3 included
    drop = ("epoch_seconds", "eval_seconds", "images_per_s", "data_wait_share")
    rows = [[{k: v for k, v in r.items() if k not in drop} for r in run["metrics"]] for run in (straight, resumed)]
    assert rows[0] == rows[1] and [r["epoch"] for r in rows[1]] == [1, 2, 3]
    assert straight["metrics"][-1]["train_images"] == runs["manifest"]["splits"]["train"]["num_samples"]


def test_every_rank_has_its_own_rng_streams_and_they_survive_a_resume(runs, workers):
    straight, resumed, after_2 = runs["straight"][workers], runs["resumed"][workers], runs["after_2"][workers]
    names = [f"rank_state_{r}.pt" for r in range(1 if workers == "wds" else workers)]
    assert sorted(straight["ranks"]) == sorted(resumed["ranks"]) == names
    for name in names:
        assert identical(straight["ranks"][name]["rng"], resumed["ranks"][name]["rng"])
        assert not identical(after_2["ranks"][name]["rng"]["torch"], resumed["ranks"][name]["rng"]["torch"])
    if workers == 2:
        a, b = (straight["ranks"][n]["rng"] for n in names)
        for key in ("torch", "python", "numpy"):
            assert not identical(a[key], b[key]), key


def test_a_killed_worker_is_replaced_and_training_resumes(runs):
    log = runs["logs"]["killed"]
    assert re.search(r"resuming from .* after epoch [1-3]", log), log[-3000:]
    run = runs["storage"][2] / "killed"
    assert json.loads((run / ".workers" / "rank1.json").read_text())["pid"] != runs["victim"]  # a new worker
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    # progress inside each epoch (rank 0 only), and none of Ray's own per-report lines
    assert re.search(r"epoch 4/4 step 15/19 \| [\d.]+ img/s \| data wait \d+% \| loss [\d.]+ \| lr [\d.e-]+ \| "
                     r"ETA epoch \d+:\d\d:\d\d, run \d+:\d\d:\d\d", log), log[-3000:]
    assert "TrainingReport(" not in log and "Checkpoint successfully created" not in log


def test_a_new_run_continues_from_another_runs_checkpoint_with_a_change_applied(runs):
    """--resume PATH into a new run, with --allow-changes for a new lr: it starts at epoch 4 at
    the new lr, and records the change."""
    log = runs["logs"]["other"]
    assert "straight/checkpoint_epoch_0003 after epoch 3" in log and "lr 0.005 -> 0.001" in log, log[-3000:]
    run = runs["storage"][1] / "other"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    drops = runs["straight"][1]["metrics"][-1]["lr_drops"]  # taken by epoch 3, kept: lr 0.005 -> 0.001 rescales
    assert [r["epoch"] for r in rows] == [4] and rows[0]["lr"] == pytest.approx(0.001 * 0.1 ** drops)
    change = json.loads((run / "config_changes.jsonl").read_text().splitlines()[-1])
    assert change["changes"] == {"lr": [0.005, 0.001]}
    assert json.loads((run / "config.json").read_text())["lr"] == 0.001
    ckpt = latest_checkpoint(run)
    assert ckpt.name == "checkpoint_epoch_0004" and read_meta(ckpt)["run"] == "other"
    shared = torch.load(ckpt / "train_state.pt", weights_only=True)
    after = rows[0]["lr"] * 0.1 ** (rows[0]["lr_drops"] - drops)  # (epoch 4 may have dropped it again)
    assert [g["lr"] for g in shared["optimizer"]["param_groups"]] == [pytest.approx(after)] * 2


def test_retention_keeps_the_best_by_val_error_and_the_newest(runs):
    """--keep-checkpoints 2 (the default): of a 3-epoch run's checkpoints the two with the
    lowest val top-1 error stay, and the newest (the one latest_checkpoint.json names) always does."""
    run = runs["storage"][1] / "straight"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    kept = {int(p.name.rsplit("_", 1)[1]) for p in run.glob("checkpoint_epoch_*")}
    errors = [r["val_top1_error"] for r in rows]
    assert 3 in kept and len(kept) <= 3 and min(errors[e - 1] for e in kept) == min(errors), (kept, errors)
    if len(set(errors)) == len(errors):  # no ties: exactly the two best and the newest
        assert kept == {r["epoch"] for r in sorted(rows, key=lambda r: r["val_top1_error"])[:2]} | {3}
    assert latest_checkpoint(run).name == "checkpoint_epoch_0003"


def test_changed_settings_are_refused_before_any_worker_starts_naming_each(runs):
    """fit() refuses before it even connects to Ray (no address is given here)."""
    data, storage = runs["data"], runs["storage"][1]
    run = storage / "other"
    config_before = (run / "config.json").read_text()
    with pytest.raises(TrainSetupError) as refused:
        fit(tiny(data, storage, "other", epochs=5, lr=0.002, momentum=0.8))
    assert "lr: 0.001 -> 0.002" in str(refused.value) and "momentum: 0.9 -> 0.8" in str(refused.value)
    assert "--allow-changes" in str(refused.value)
    with pytest.raises(TrainSetupError, match="loader: 'dali' -> 'webdataset'"):  # another data stream
        fit(tiny(data, storage, "other", epochs=5, lr=0.001, loader="webdataset"))
    with pytest.raises(TrainSetupError, match="input_size cannot change"):
        fit(tiny(data, storage, "other", epochs=5, lr=0.001, input_size=99), allow_changes=True)
    assert (run / "config.json").read_text() == config_before and latest_checkpoint(run).name.endswith("0004")


def test_the_divergence_guard_stops_the_run_naming_where_and_the_last_good_checkpoint(runs):
    output = runs["logs"]["diverged"]
    assert "the divergence guard stopped run" in output and "in epoch 4 at step" in output, output[-3000:]
    assert "Last good checkpoint: " in output and "checkpoint_epoch_0003" in output
    run = runs["storage"][1] / "straight"
    assert json.loads((run / "diverged.json").read_text())["epoch"] == 4
    assert latest_checkpoint(run).name == "checkpoint_epoch_0003"  # nothing saved after the blow-up


def test_evaluate_a_checkpoint_centre_and_ten_crop_with_either_loader(runs, tmp_path):
    run = runs["storage"][1] / "straight"
    out = tmp_path / "eval.json"
    cmd = [sys.executable, "-m", "trainer.evaluate", str(run), "--data", str(runs["data"])]
    procs = [subprocess.Popen(cmd + ["--json", str(out)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True),
             subprocess.Popen(cmd + ["--loader", "webdataset"], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)]
    (stdout, stderr), (wds_stdout, wds_stderr) = (p.communicate(timeout=600) for p in procs)
    assert procs[0].returncode == 0, stderr[-3000:]
    assert procs[1].returncode == 0, wds_stderr[-3000:]
    result, wds = json.loads(stdout), json.loads(wds_stdout)
    assert result == json.loads(out.read_text()) and result["loader"] == "dali" and wds["loader"] == "webdataset"
    # the same pixels (tests/trainer/test_backends.py), the same batches: the same predictions, and
    # the same losses up to float rounding (CPU kernels may sum in another order: 8e-8 relative seen in CI)
    assert result.keys() == wds.keys()
    assert {k: v for k, v in result.items() if k != "loader" and not k.endswith("_loss")} == \
        {k: v for k, v in wds.items() if k != "loader" and not k.endswith("_loss")}
    assert [result[k] for k in result if k.endswith("_loss")] == \
        [pytest.approx(wds[k], rel=1e-6) for k in result if k.endswith("_loss")]
    val = runs["manifest"]["splits"]["val"]["num_samples"]
    assert result["epoch"] == 3 and result["center_images"] == result["ten_crop_images"] == val
    last = runs["straight"][1]["metrics"][-1]
    # the same pipeline and the same weights as the run's own validation of epoch 3
    # (a near-tie may flip with another batch size: one image at most)
    assert result["center_top1_error"] == pytest.approx(last["val_top1_error"], abs=1.01 / val)
    assert result["center_top5_error"] == pytest.approx(last["val_top5_error"], abs=1.01 / val)
    assert 0 <= result["ten_crop_top1_error"] <= 1 and "10 crops: top-1 error" in stderr
