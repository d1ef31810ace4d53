"""`make test-gpu`, as a user types it: on a machine without a CUDA GPU (this one, CI's) it
runs nothing, says why, and fails, rather than passing with every gpu test skipped."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

from tests.helpers import REPO


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: make test-gpu runs the gpu tests")
@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_test_gpu_refuses_without_a_gpu():
    r = subprocess.run(
        ["make", "--no-print-directory", "test-gpu"], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert r.returncode != 0
    assert "make test-gpu: 0 CUDA device(s)" in r.stdout and "no CUDA GPU here" in r.stderr, r.stdout + r.stderr
    assert "pytest" not in r.stdout  # nothing was run
