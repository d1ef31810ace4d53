"""Serving's predictor on a GPU (marked `gpu`: skipped where there is none, never faked): the
device it picks by default, and the same answers as on the CPU, one crop and ten."""

from __future__ import annotations

import pytest
import torch

from serving.predictor import Predictor
from tests.serving.helpers import jpeg

pytestmark = pytest.mark.gpu


def test_the_predictor_picks_the_gpu_and_answers_as_on_the_cpu(checkpoint):
    gpu = Predictor(checkpoint)  # device "auto": the GPU where there is one
    cpu = Predictor(checkpoint, device="cpu")
    assert gpu.device.type == "cuda" and {p.device.type for p in gpu.model.parameters()} == {"cuda"}
    allow = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for ten_crop in (False, True):
            crops = cpu.preprocess(jpeg(), ten_crop=ten_crop)
            logits, embedding = gpu.forward(crops)
            expected_logits, expected_embedding = cpu.forward(crops)
            assert logits.device.type == "cpu" and logits.shape == (10 if ten_crop else 1, 10)
            torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(embedding, expected_embedding, rtol=1e-4, atol=1e-4)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = allow
