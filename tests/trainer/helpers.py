"""What the trainer's tests share: the truth read straight from the tars, a locator for
random crops (the input back-ends' tests; no DALI needed), and trainer.run's main() on several
command lines in one process."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from pipeline.sharded import decode_jpeg
from pipeline.transforms import Normalization
from tests.helpers import read_tar


def truth(out: Path, manifest: dict, split: str) -> dict[str, tuple[int, np.ndarray]]:
    """key -> (label, decoded 256x256 image), read straight from the tars."""
    samples = {}
    for shard in manifest["splits"][split]["shards"]:
        members = dict(read_tar(out / shard["tar"]))
        for name, data in members.items():
            if name.endswith(".jpg"):
                key = name[:-4]
                samples[key] = (int(members[key + ".cls"]), decode_jpeg(data))
    return samples


def locate(patch_chw: np.ndarray, image: np.ndarray, norm: Normalization) -> tuple[int, int, bool] | None:
    """Find (top, left, mirrored) of a train crop (lighting off) inside its source image:
    a small probe narrows the candidates (vectorised), the whole patch confirms."""
    crop = patch_chw.shape[1]
    target = patch_chw.transpose(1, 2, 0) * np.asarray(norm.std, np.float32) + np.asarray(norm.mean, np.float32)
    span = image.shape[0] - crop + 1
    probe = target[:2, :8]
    for mirrored in (False, True):
        src = np.ascontiguousarray(image[:, ::-1] if mirrored else image).astype(np.float32)
        windows = np.lib.stride_tricks.sliding_window_view(src, probe.shape)[:span, :span, 0]
        hits = np.argwhere(np.abs(windows - probe).max(axis=(2, 3, 4)) < 0.01)
        for top, left in hits:
            if np.allclose(src[top : top + crop, left : left + crop], target, atol=0.01):
                return int(top), int(image.shape[1] - crop - left) if mirrored else int(left), mirrored
    return None


def assert_progress_without_ray_spam(log: str, epochs: int) -> None:
    """Progress inside each epoch (rank 0 only), and none of Ray's own per-report lines."""
    assert re.search(
        rf"epoch {epochs}/{epochs} step 15/19 \| [\d.]+ img/s \| data wait \d+% \| loss [\d.]+ \| lr [\d.e-]+ \| "
        r"ETA epoch \d+:\d\d:\d\d, run \d+:\d\d:\d\d",
        log,
    ), log[-3000:]
    assert "TrainingReport(" not in log and "Checkpoint successfully created" not in log


# trainer.run's main() on each argv in turn, in one process, marking where each call's output
# ends on stdout and stderr (a `python -m trainer.run` per argv would pay its imports again,
# ~3 CPU-seconds each).
MAIN_EACH = """
import json, sys
from trainer.run import main
for argv in json.loads(sys.argv[1]):
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse: --help, a bad flag
        rc = exc.code
    for stream in (sys.stdout, sys.stderr):  # one write each: no other output lands inside
        stream.write("%s%d\\n" % (sys.argv[2], rc or 0))
        stream.flush()
"""
END = "=== main() returned "


def run_main_each(
    argvs: list[list[str]], env: dict, cwd: Path, timeout: float = 600
) -> list[subprocess.CompletedProcess]:
    """What `python -m trainer.run ARGV` returns and prints, for each ARGV, from one process."""
    r = subprocess.run(
        [sys.executable, "-c", MAIN_EACH, json.dumps(argvs), END],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    outs, errs = (re.split(rf"^{re.escape(END)}(-?\d+)\n", text, flags=re.M) for text in (r.stdout, r.stderr))
    assert len(outs) == len(errs) == 2 * len(argvs) + 1, r.stderr[-3000:]
    return [
        subprocess.CompletedProcess(argv, int(errs[2 * i + 1]), outs[2 * i], errs[2 * i])
        for i, argv in enumerate(argvs)
    ]
