"""The Open Inference Protocol over HTTP as a plain HTTP client (curl) speaks it, against the
real service with a token: JSON requests (images as base64 BYTES, preprocessed FP32 tensors),
Triton's binary tensor data extension built by hand, the protocol's error shape for every
refusal, and the limits the image endpoints have. No ecosystem client needed
(tests/serving/test_v2_clients.py has those)."""

from __future__ import annotations

import base64
import json
import struct

import httpx
import numpy as np
import pytest

from pipeline.preprocess import DEFAULT_JPEG_QUALITY
from pipeline.sharded import as_sharded
from pipeline.transforms import eval_crops
from tests.serving.helpers import AUTH, jpeg, metric
from trainer.checkpoint import read_meta

INFER = "/v2/models/alexnet/infer"


def top5(url: str, image: bytes) -> list[int]:
    r = httpx.post(f"{url}/predict", content=image, headers={**AUTH, "content-type": "image/jpeg"}, timeout=60)
    assert r.status_code == 200, r.text
    return [p["index"] for p in r.json()["predictions"]]


def b64_request(*images: bytes, **extra) -> dict:
    """What the README's curl sends: images as base64 BYTES (MLServer's content_type)."""
    return {
        "inputs": [
            {
                "name": "image",
                "shape": [len(images)],
                "datatype": "BYTES",
                "parameters": {"content_type": "base64"},
                "data": [base64.b64encode(i).decode() for i in images],
            }
        ],
        **extra,
    }


def post(url: str, body, headers=AUTH, path: str = INFER) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        f"{url}{path}", content=content, headers={"content-type": "application/json", **headers}, timeout=60
    )


def output(answer: dict, name: str) -> np.ndarray:
    (tensor,) = [t for t in answer["outputs"] if t["name"] == name]
    return np.array(tensor["data"]).reshape(tensor["shape"])


@pytest.fixture(scope="module")
def url(guarded):
    return guarded[0]


def test_json_with_base64_images_gets_the_top5_of_predict(url, checkpoint):
    images = [jpeg((320, 240), (200, 30, 30)), jpeg((300, 400), (20, 160, 90))]
    r = post(url, b64_request(*images, id="req-7", parameters={"top_k": 5}))
    assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.text
    answer = r.json()
    assert answer["model_name"] == "alexnet" and answer["model_version"] == str(read_meta(checkpoint).epoch)
    assert answer["id"] == "req-7"
    assert [t["name"] for t in answer["outputs"]] == ["top_k_indices", "top_k_wnids", "top_k_probabilities"]
    assert output(answer, "top_k_indices").tolist() == [top5(url, i) for i in images]
    wnids = [c["wnid"] for c in read_meta(checkpoint).classes]
    assert output(answer, "top_k_wnids").tolist() == [[wnids[i] for i in top5(url, im)] for im in images]
    # Named outputs only, logits among them, and another k.
    r = post(
        url, b64_request(images[0], parameters={"top_k": 2}, outputs=[{"name": "logits"}, {"name": "top_k_indices"}])
    )
    answer = r.json()
    assert [t["name"] for t in answer["outputs"]] == ["logits", "top_k_indices"]
    assert output(answer, "top_k_indices").tolist() == [top5(url, images[0])[:2]]
    assert np.argsort(-output(answer, "logits")[0])[:5].tolist() == top5(url, images[0])


def test_a_preprocessed_fp32_tensor_in_json_and_as_binary_data(url, checkpoint):
    image = jpeg((256, 320), (40, 90, 220))
    meta = read_meta(checkpoint)
    crop = eval_crops(
        as_sharded(image, quality=meta.jpeg_quality or DEFAULT_JPEG_QUALITY), meta.input_size, meta.normalization
    )
    spec = {"name": "input", "shape": list(crop.shape), "datatype": "FP32"}
    r = post(url, {"inputs": [{**spec, "data": crop.reshape(-1).tolist()}]})
    assert r.status_code == 200, r.text
    assert output(r.json(), "top_k_indices").tolist() == [top5(url, image)]
    # Triton's binary tensor data extension: JSON, then the raw tensor; a binary output back.
    head = json.dumps(
        {
            "inputs": [{**spec, "parameters": {"binary_data_size": crop.nbytes}}],
            "outputs": [{"name": "top_k_indices", "parameters": {"binary_data": True}}, {"name": "top_k_wnids"}],
        }
    ).encode()
    r = httpx.post(
        f"{url}{INFER}",
        content=head + crop.astype("<f4").tobytes(),
        headers={**AUTH, "content-type": "application/octet-stream", "inference-header-content-length": str(len(head))},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    size = int(r.headers["inference-header-content-length"])
    answer, blob = json.loads(r.content[:size]), r.content[size:]
    indices, wnids = answer["outputs"]
    assert indices["parameters"]["binary_data_size"] == len(blob) == 5 * 8 and "data" not in indices
    assert np.frombuffer(blob, "<i8").tolist() == top5(url, image)
    assert len(wnids["data"]) == 5  # not asked for as binary: JSON
    # BYTES as binary data: each element length-prefixed.
    raw = struct.pack("<I", len(image)) + image
    head = json.dumps(
        {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": len(raw)}}]}
    ).encode()
    r = httpx.post(
        f"{url}{INFER}",
        content=head + raw,
        headers={**AUTH, "content-type": "application/octet-stream", "inference-header-content-length": str(len(head))},
        timeout=60,
    )
    assert output(r.json(), "top_k_indices").tolist() == [top5(url, image)]


def test_health_metadata_and_readiness(url, checkpoint):
    assert httpx.get(f"{url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{url}/v2/health/ready").json() == {"ready": True}
    assert httpx.get(f"{url}/v2").json()["extensions"] == ["binary_tensor_data"]
    assert httpx.get(f"{url}/v2/models/alexnet/ready").status_code == 200
    epoch = read_meta(checkpoint).epoch
    assert httpx.get(f"{url}/v2/models/alexnet/versions/{epoch}/ready").status_code == 200
    meta = httpx.get(f"{url}/v2/models/alexnet", headers=AUTH).json()
    assert meta["versions"] == [str(epoch)] and [t["name"] for t in meta["inputs"]] == ["image", "input"]
    assert metric(url, "alexnet_requests_total", 'endpoint="/v2/models/{name}/ready",status="200"') >= 2


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (b"{not json", 400, "not JSON"),
        ({"inputs": "image"}, 400, '"inputs"'),
        ({"inputs": []}, 400, "exactly one input"),
        ({"inputs": [{"name": "pixels", "shape": [1], "datatype": "FP32", "data": [1.0]}]}, 400, "no input 'pixels'"),
        ({"inputs": [{"name": "input", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": [0.0] * 192}]}, 400, "shape"),
        (
            {"inputs": [{"name": "input", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": [0.0]}]},
            400,
            "192 expected",
        ),
        ({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["aGk="]}]}, 400, "image[0]"),
        ({"inputs": [{"name": "image", "shape": [-1], "datatype": "BYTES", "data": []}]}, 400, "non-negative"),
        ({**b64_request(b"x"), "outputs": [{"name": "probs"}]}, 400, "no output 'probs'"),
        ({**b64_request(b"x"), "parameters": {"top_k": 0}}, 400, "top_k"),
        (b64_request(*[b"x"] * 33), 400, "33 images in one request"),
    ],
)
def test_bad_requests_get_400_in_the_protocols_error_shape(url, body, status, says):
    r = post(url, body)
    assert r.status_code == status and set(r.json()) == {"error"} and says in r.json()["error"], r.text


def test_refusals_are_in_the_protocols_error_shape(url):
    image = jpeg()
    r = post(url, b64_request(image), headers={})
    assert r.status_code == 401 and set(r.json()) == {"error"} and r.headers["www-authenticate"].startswith("Bearer")
    assert post(url, b64_request(image), headers={}, path="/v2/models/alexnet").status_code in (401, 405)
    assert httpx.get(f"{url}/v2/models/alexnet").status_code == 401  # metadata: the token too
    r = post(url, b64_request(image), path="/v2/models/resnet/infer")
    assert r.status_code == 404 and "alexnet" in r.json()["error"]
    r = post(url, b64_request(image), path="/v2/models/alexnet/versions/999/infer")
    assert r.status_code == 404 and "version" in r.json()["error"]
    assert httpx.get(f"{url}/v2/nothing").json() == {"error": "Not Found"}
    # The upload limit holds for the protocol's bodies (Content-Length over it: 413 unread).
    r = httpx.post(
        f"{url}{INFER}",
        content=b"0" * (10 * 1024 * 1024 + 1),
        headers={**AUTH, "content-type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 413 and "limit" in r.json()["error"]
    # The old endpoints keep their own shape.
    assert set(httpx.post(f"{url}/predict", content=image, headers={"content-type": "image/jpeg"}).json()) == {
        "error",
        "detail",
    }
