"""serving.inference: the optimized path answers what the network as trained answers.

The answer check: a 1000-class network (top-5 out of 1000 is a real ranking, unlike the
sample set's few classes), the photographs of ../shared/photos as requests, centre crop and
the paper's 10 crops, through `Predictor` with inference "eager" (the baseline) and
"optimized": top-5 identical for every image, logits and fc7 embeddings within LOGIT_TOLERANCE
(the pooled values are the same floats; the inference LRN's d^-0.75 differs from pow's by a
few float32 roundings: measured 4e-6 on logits of up to ~50)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.transforms import Normalization
from serving.inference import InferenceLRN, StridedMaxPool2d, keep_freed_memory, prepare, resolve
from serving.predictor import Predictor
from serving.settings import Settings
from trainer.checkpoint import ShardsMeta, save
from trainer.lrn import PaperLRN
from trainer.model import AlexNet, AlexNetConfig

PHOTOS = Path(__file__).resolve().parents[3] / "shared" / "photos"
LOGIT_TOLERANCE = 1e-4  # absolute, on logits of magnitude ~50 (measured: ~4e-6)


@pytest.fixture(scope="module")
def imagenet_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = AlexNet(AlexNetConfig(num_classes=1000, init="kaiming")).eval()
    return save(
        tmp_path_factory.mktemp("inference") / "checkpoint_0001",
        model,
        classes=[{"index": i, "wnid": f"n{i:08d}", "name": f"class {i}"} for i in range(1000)],
        normalization=Normalization((123.0, 117.0, 104.0)),
        epoch=1,
        metrics={},
        shards=ShardsMeta(jpeg_quality=90),
    )


@pytest.mark.parametrize(
    "shape", [(32, 48, 55, 55), (1, 128, 27, 27), (3, 128, 13, 13), (1, 1, 3, 3), (2, 3, 8, 7), (1, 2, 4, 12)]
)
def test_strided_max_pool_is_max_pool2d_exactly(shape):
    torch.manual_seed(0)
    x = torch.randn(*shape)
    for inputs in (x, F.relu(x), torch.zeros(shape), x.round()):  # ties: ReLU zeros, flat maps, repeats
        assert torch.equal(StridedMaxPool2d(3, 2)(inputs), F.max_pool2d(inputs, 3, 2))
    assert torch.equal(StridedMaxPool2d(2, 2)(x), F.max_pool2d(x, 2, 2))
    assert torch.equal(StridedMaxPool2d(3, 1)(x), F.max_pool2d(x, 3, 1))


@pytest.mark.parametrize("beta", [0.75, 0.5])
def test_inference_lrn_is_paper_lrn_within_float32_rounding(beta):
    torch.manual_seed(0)
    lrn = PaperLRN(5, 1e-4, beta, 2.0)
    for shape in [(2, 48, 55, 55), (1, 128, 27, 27), (1, 3, 4, 4)]:
        x = F.relu(torch.randn(*shape) * 40)  # conv1-like magnitudes: the alpha term matters
        with torch.no_grad():
            ref, fast = lrn(x), InferenceLRN(lrn)(x)
        rel = ((ref - fast).abs() / ref.abs().clamp_min(1e-12)).max()
        assert float(rel) <= 1e-6, (shape, float(rel))  # a few float32 ulps
        assert float((ref - x / 2**beta).abs().max()) > 1e-3  # the window sum really moved it
    x = torch.randn(1, 8, 3, 3, requires_grad=True)  # training-style input: the paper's function
    assert torch.equal(InferenceLRN(lrn)(x), lrn(x))


def test_keep_freed_memory_on_glibc():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert keep_freed_memory()


def test_modes_resolve_and_swap_only_plain_pools():
    assert resolve("auto", torch.device("cpu")) == "optimized"
    assert resolve("auto", torch.device("cuda", 0)) == "eager"
    assert resolve("eager", torch.device("cpu")) == "eager"
    with pytest.raises(ValueError, match="unknown inference mode"):
        resolve("fast", torch.device("cpu"))
    model, used = prepare(AlexNet(AlexNetConfig(num_classes=10)).eval(), "optimized", torch.device("cpu"))
    assert used == "optimized"
    assert not any(isinstance(m, (torch.nn.MaxPool2d, PaperLRN)) for m in model.modules())
    assert sum(isinstance(m, InferenceLRN) for m in model.modules()) == 4  # conv1 and conv2, both columns
    padded = torch.nn.Sequential(torch.nn.MaxPool2d(3, 2, padding=1))
    prepare(padded, "optimized", torch.device("cpu"))  # type: ignore[arg-type]
    assert isinstance(padded[0], torch.nn.MaxPool2d)  # a pool the strided form does not reproduce stays


@pytest.mark.skipif(not PHOTOS.is_dir(), reason="../shared/photos not present")
def test_optimized_answers_are_the_eager_answers_on_photographs(imagenet_checkpoint):
    eager = Predictor(imagenet_checkpoint, Settings.model_construct(inference="eager"))
    optimized = Predictor(imagenet_checkpoint, Settings.model_construct(inference="optimized"))
    assert (eager.inference, optimized.inference) == ("eager", "optimized")
    photos = [p.read_bytes() for p in sorted(PHOTOS.glob("*.jpg"))]
    assert len(photos) >= 10
    for ten_crop in (False, True):
        crops = np.concatenate([eager.preprocess(data, ten_crop=ten_crop) for data in photos])
        logits, fc7 = eager.forward(crops)
        fast_logits, fast_fc7 = optimized.forward(crops)
        assert torch.equal(logits.topk(5).indices, fast_logits.topk(5).indices)
        assert float((logits - fast_logits).abs().max()) <= LOGIT_TOLERANCE
        assert float((fc7 - fast_fc7).abs().max()) <= LOGIT_TOLERANCE
        assert float(logits.abs().max()) > 1  # real logits, not a degenerate network
    one = eager.preprocess(photos[0])  # a batch of one, as a lone request runs
    assert torch.equal(eager.forward(one)[0].topk(5).indices, optimized.forward(one)[0].topk(5).indices)
