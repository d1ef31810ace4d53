"""`python -m benchmarks.gpu_check --dry-run`: the GPU check's own code, run on the CPU at tiny
sizes, so that the day a GPU is lent the one command works (issue 26 runs it for real). What
is checked is that every section ran and reported, in JSON and markdown, not the numbers."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import REPO


def test_the_dry_run_runs_every_section_and_writes_json_and_a_summary(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    result = json.loads(r.stdout)
    assert result == json.loads((tmp_path / "gpu_check.json").read_text()) and result["dry_run"]
    sections = result["sections"]
    assert set(sections) == {"train_step", "loop", "serving", "estimate", "train_step_compile"}
    assert not [name for name, s in sections.items() if "error" in s or "skipped" in s], sections
    for batch in ("2", "4"):  # every variant of the step matrix measured
        rows = {**sections["train_step"]["by_batch"][batch], **sections["train_step_compile"]["by_batch"][batch]}
        for variant in (
            "fp32",
            "bf16_channels_last",
            "bf16_channels_last_compile",
            "grouped_bf16_channels_last",
            "bf16_channels_last_cudnn_benchmark",
        ):
            assert rows[variant]["img_per_s"] > 0 and rows[variant]["tflops"] > 0, rows[variant]
        assert rows["fp32"]["devices"] == ["cpu", "cpu"]
        assert rows["columns_over_grouped"] > 0 and rows["compile_over_eager"] > 0
    assert sections["train_step"]["step_flops_per_image"] > 0
    loop = sections["loop"]
    assert loop["shard_set"]["train"] == 48 and loop["synthetic"]["img_per_s"] > 0
    # DALI where it is installed (the CPU decoder here; "mixed" on a GPU)
    assert loop["dali"].get("decoder") == "cpu" or "DALI not used" in loop["dali"].get("skipped", "")
    serving = sections["serving"]
    assert serving["batch1_latency_ms"]["p99"] >= serving["batch1_latency_ms"]["p50"] > 0
    assert serving["ten_crop_latency_ms"]["p50"] > 0 and set(serving["forward_by_batch"]) == {"2", "4"}
    assert sections["estimate"]["paper_90_epochs_hours_one_gpu"] > 0
    summary = (tmp_path / "gpu_check.md").read_text()
    for heading in ("## Train step", "## The training loop", "## Serving's predictor", "## The paper's 90 epochs"):
        assert heading in summary
    assert "DRY RUN" in summary


def test_without_dali_the_loop_is_the_synthetic_one_and_the_stand_in_is_labelled(tmp_path):
    """The lent GPU machine has no DALI: the path it takes, here with --no-dali, and the sections
    it feeds alone (--only: the step matrix, measured by the test above, is not run again)."""
    only = "loop,serving,estimate"
    nothing = tmp_path / "no-photos"  # a checkout without ../shared/photos: the sample's drawings
    nothing.mkdir()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.gpu_check",
            "--dry-run",
            "--no-dali",
            "--only",
            only,
            "--photos",
            str(nothing),
            "--out",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    sections = json.loads(r.stdout)["sections"]
    assert sections["loop"]["dali"] == {"skipped": "DALI not used: --no-dali"}
    stand_in = sections["loop"]["nvjpeg_stand_in"]
    assert "stand-in" in stand_in.get("label", "") or "torchvision not installed" in stand_in.get("skipped", "")
    assert sections["estimate"]["basis"].startswith("the synthetic loop")
    assert "error" not in sections["serving"]
    assert "using the sample data's drawn pictures" in r.stderr
    assert sections["train_step"] == sections["train_step_compile"] == {"skipped": "not chosen (--only)"}


def test_without_a_gpu_and_without_dry_run_it_says_so():
    r = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--out", "/nonexistent"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "no CUDA device here" in r.stderr and "--dry-run" in r.stderr
