"""The README's demo command end to end (shard -> Ray job -> serve -> predict), checking
every artefact it leaves."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.raycluster import ray_env

pytestmark = pytest.mark.slow


def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    # Bytes, not text: universal newlines would turn a progress bar's \r updates into lines.
    # Small inputs (every stage the same, epochs of seconds); `make demo` runs the paper's 227.
    cmd = [sys.executable, "-m", "deploy.demo", "--out", str(out), "--epochs", "2", "--input-size", "67"]
    r = subprocess.run(cmd, cwd=REPO, env=ray_env(), capture_output=True, timeout=1200)
    r.stdout, r.stderr = r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for stage in ("1/5", "2/5", "3/5", "4/5", "5/5"):
        assert f"==== {stage}" in r.stderr
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["num_samples"] == 297
    run = out / "runs" / "demo"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2]
    assert any(p.name.startswith("checkpoint_") and (p / "model.safetensors").is_file() for p in run.iterdir())
    from PIL import Image

    sizes = {
        "learning_curves.png": (800, 600),
        "conv1_kernels.png": (12 * 46 + 2 + 10, 8 * 46 + 2),
        "retrieval.png": (96 * 7 + 16 + 8 * 6, 5 * (96 + 8)),
    }
    for name, size in sizes.items():
        png = (run / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000, name
        assert Image.open(run / name).size == size, name
    summary = json.loads((out / "prediction.json").read_text())
    # every held-out image the sharder kept was answered; the served accuracy is the run's own
    assert summary["answered"] == 99
    assert summary["accuracy"] == pytest.approx(1 - rows[-1]["val_top1_error"], abs=0.011)
    examples = summary["examples"]
    assert len(examples) == 3 and len({e["true_wnid"] for e in examples}) == 3
    for e in examples:  # right answers, shown as such, from the final checkpoint
        assert e["predictions"][0]["wnid"] == e["true_wnid"] == Path(e["image"]).parent.name
        assert e["checkpoint"]["epoch"] == 2 and len(e["predictions"]) == 5
        assert f"curl -F file=@{e['image']} http://127.0.0.1:" in r.stderr  # (outside the cwd: absolute)
    assert "Ray head up" in r.stderr and "stopping Ray" in r.stderr
    console = (r.stdout + r.stderr).split("\n")  # a progress bar's \r updates share one line
    assert len(console) <= 100, "\n".join(line.rsplit("\r", 1)[-1] for line in console)  # two screens
    assert "TrainingReport(" not in r.stderr and "Checkpoint successfully created" not in r.stderr
