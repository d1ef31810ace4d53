"""ALEXNET_BACKEND=onnxruntime: the real service exports its checkpoint to ONNX as it loads
(trainer.export's functions and parity check) and answers from ONNX Runtime what the PyTorch
back-end answers, over /predict, /embed and the Open Inference Protocol. Skipped where the
`onnx` extra is not installed (a serving-only install)."""

from __future__ import annotations

import httpx
import pytest

from tests.helpers import photographs
from tests.serving.helpers import jpeg, running_server

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def onnx_server(checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("onnx") / "server.log"
    with running_server(["--checkpoint", str(checkpoint), "--backend", "onnxruntime"], log) as url:
        yield url


def predict(url: str, image: bytes) -> list[dict]:
    r = httpx.post(f"{url}/predict", content=image, headers={"content-type": "image/jpeg"}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["predictions"]


@pytest.mark.slow
def test_the_onnx_runtime_back_end_answers_what_the_torch_one_does(server, onnx_server):
    assert httpx.get(f"{onnx_server}/ready").json()["backend"] == "onnxruntime"
    assert httpx.get(f"{server}/ready").json()["backend"] == "torch"
    for image in photographs(4) or [jpeg(), jpeg((200, 300), (10, 200, 40))]:
        ours, reference = predict(onnx_server, image), predict(server, image)
        assert [p["index"] for p in ours] == [p["index"] for p in reference]
        assert [p["probability"] for p in ours] == pytest.approx([p["probability"] for p in reference], abs=1e-4)
    image = jpeg()
    embeddings = [
        httpx.post(f"{u}/embed", content=image, headers={"content-type": "image/jpeg"}, timeout=60).json()["embedding"]
        for u in (onnx_server, server)
    ]
    assert embeddings[0] == pytest.approx(embeddings[1], abs=1e-3)
    assert httpx.get(f"{onnx_server}/v2/models/alexnet").json()["platform"] == "onnxruntime_onnx"
