"""The prediction service against a real uvicorn process on loopback (plus TestClient for
settings that need their own app)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from serving.app import create_app
from serving.settings import Settings
from tests.helpers import REPO
from tests.serving.helpers import UPLOAD_LIMIT, encode, jpeg, serving_env
from trainer.checkpoint import load_model
from trainer.checkpoint_meta import CheckpointError


def post(url: str, data: bytes, ctype: str = "image/jpeg", **params) -> httpx.Response:
    return httpx.post(f"{url}/predict", content=data, headers={"content-type": ctype}, params=params, timeout=60)


def test_predict_schema_sorted_probabilities_and_identity(server, sample_root):
    image = next((sample_root / "val").glob("*/*.JPEG")).read_bytes()
    r = httpx.post(f"{server}/predict", files={"file": ("x.jpg", image, "image/jpeg")}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    preds = body["predictions"]
    assert len(preds) == 5 and set(preds[0]) == {"index", "wnid", "name", "probability"}
    probs = [p["probability"] for p in preds]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert preds[0]["wnid"].startswith("n") and preds[0]["name"]
    assert body["checkpoint"]["epoch"] == 1 and body["checkpoint"]["num_classes"] == 10
    assert {"preprocess_ms", "inference_ms"} <= set(body["timing"])
    raw = post(server, image, k=10).json()["predictions"]  # raw body, another k
    assert len(raw) == 10 and abs(sum(p["probability"] for p in raw) - 1) < 1e-4
    ten = post(server, image, crops=10).json()
    assert ten["crops"] == 10 and len(ten["predictions"]) == 5


def test_parity_with_the_trainers_eval_path(server, shard_set, sample_root, checkpoint):
    """The service's probabilities for a raw image equal what the trainer's evaluation
    (DALI val pipeline on the sharded image + the same checkpoint) computes."""
    pytest.importorskip("nvidia.dali", reason="the trainer's eval path needs DALI (not in a serving-only install)")
    from pipeline.shardset import open_shard_set
    from trainer.dali_loader import DaliLoader
    from trainer.loaders import DataConfig

    shards = open_shard_set(shard_set[0])
    model, meta = load_model(checkpoint)
    loader = DaliLoader(shards, "val", DataConfig(mode="center", batch_size=8, divide_by_std=True, with_keys=True))
    images, labels, keys = next(iter(loader))
    with torch.no_grad():
        trainer_probs = model(images).softmax(1).numpy()
    for i, key in enumerate(keys[:4]):
        raw = next((sample_root / "val").glob(f"*/{key}.JPEG")).read_bytes()
        got = post(server, raw, k=10).json()["predictions"]
        service = np.zeros(10)
        for p in got:
            service[p["index"]] = p["probability"]
        np.testing.assert_allclose(service, trainer_probs[i], atol=1e-5)


def bomb() -> bytes:
    return encode(Image.new("1", (10_000, 10_000)), "PNG")  # 100 MP in a few KB


def animated() -> bytes:
    frames = [Image.new("RGB", (64, 64), (255, 0, 0)), Image.new("RGB", (64, 64), (0, 0, 255))]
    return encode(frames[0], "PNG", save_all=True, append_images=frames[1:])


@pytest.mark.parametrize(
    "name,data,ctype,params,status,error",
    [
        ("empty body", b"", "image/jpeg", {}, 400, "empty_body"),
        ("not an image", b"certainly not a picture" * 10, "image/jpeg", {}, 400, "invalid_image"),
        ("truncated", jpeg()[:400], "image/jpeg", {}, 400, "invalid_image"),
        ("wrong content type", jpeg(), "text/plain", {}, 415, "unsupported_media_type"),
        ("oversize", b"\xff\xd8" + bytes(UPLOAD_LIMIT + 10), "image/jpeg", {}, 413, "payload_too_large"),
        ("decompression bomb", bomb(), "image/png", {}, 413, "too_large"),
        ("absurd dimensions", encode(Image.new("L", (30_000, 2)), "PNG"), "image/png", {}, 413, "too_large"),
        ("gif", encode(Image.new("P", (64, 64)), "GIF"), "image/gif", {}, 415, "unsupported_format"),
        ("tiff", encode(Image.new("RGB", (64, 64)), "TIFF"), "image/tiff", {}, 415, "unsupported_format"),
        ("animated png", animated(), "image/png", {}, 415, "unsupported_format"),
        ("k too large", jpeg(), "image/jpeg", {"k": 11}, 400, "invalid_k"),
        ("k zero", jpeg(), "image/jpeg", {"k": 0}, 400, "invalid_k"),
        ("k not a number", jpeg(), "image/jpeg", {"k": "five"}, 422, "invalid_request"),
        ("crops 3", jpeg(), "image/jpeg", {"crops": 3}, 400, "invalid_crops"),
    ],
)
def test_bad_input_gets_a_4xx_json_error_and_the_server_stays_up(server, name, data, ctype, params, status, error):
    r = post(server, data, ctype, **params)
    assert r.status_code == status, (name, r.text)
    body = r.json()
    assert body["error"] == error and body["detail"]
    assert post(server, jpeg()).status_code == 200  # the next good request still works


def test_multipart_without_a_file_field(server):
    r = httpx.post(f"{server}/predict", data={"other": "x"}, files={"nope": ("a.txt", b"x", "text/plain")}, timeout=30)
    assert r.status_code == 400 and r.json()["error"] == "missing_file"


def test_embed_returns_the_fc7_vector(server, checkpoint):
    image = jpeg((400, 300), (20, 120, 200))
    r = httpx.post(f"{server}/embed", content=image, headers={"content-type": "image/jpeg"}, timeout=60)
    assert r.status_code == 200
    vec = np.array(r.json()["embedding"])
    assert vec.shape == (4096,) and r.json()["dim"] == 4096 and (vec >= 0).all() and vec.sum() > 0


def test_health_ready_docs_page_and_metrics(server, checkpoint):
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{server}/ready")
    assert ready.json()["ready"] is True and ready.json()["checkpoint"]["checkpoint"] == checkpoint.name
    assert str(checkpoint.parent) not in ready.text and "/tmp" not in ready.text  # names, never server paths
    assert ready.json()["index"] == {"state": "none"} and ready.json()["auth"] is False
    assert httpx.get(f"{server}/docs").status_code == 200
    assert "/predict" in httpx.get(f"{server}/openapi.json").json()["paths"]
    page = httpx.get(f"{server}/").text
    assert "<script>" in page and "http://" not in page and "https://" not in page  # no CDN
    post(server, b"", "image/jpeg")
    metrics = httpx.get(f"{server}/metrics").text

    def count(status: int) -> float:
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("alexnet_requests_total{")
            and f'status="{status}"' in line
            and 'endpoint="/predict"' in line
        )

    assert count(400) >= 1 and count(200) >= 1
    assert "alexnet_request_latency_seconds_bucket" in metrics and "alexnet_batch_size_count" in metrics
    for name in (
        "alexnet_in_flight_requests",
        "alexnet_queue_images",
        "alexnet_rejected_requests_total",
        "alexnet_dropped_images_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_cpu_seconds_total",
    ):
        assert f"\n{name}" in metrics, name


def test_concurrent_requests_share_forward_passes(server):
    image = jpeg()
    before = batch_stats(server)

    async def burst():
        async with httpx.AsyncClient(timeout=120) as client:
            rs = await asyncio.gather(
                *[
                    client.post(f"{server}/predict", content=image, headers={"content-type": "image/jpeg"})
                    for _ in range(16)
                ]
            )
        return [r.status_code for r in rs]

    assert asyncio.run(burst()) == [200] * 16
    after = batch_stats(server)
    images, batches = after[0] - before[0], after[1] - before[1]
    assert images == 16 and batches < 16  # at least some requests were batched together


def batch_stats(url: str) -> tuple[float, float]:
    text = httpx.get(f"{url}/metrics").text

    def value(name: str) -> float:
        return float(next(line.rsplit(" ", 1)[1] for line in text.splitlines() if line.startswith(name + " ")))

    return value("alexnet_batch_size_sum"), value("alexnet_batch_size_count")


def test_with_no_checkpoint_given_it_serves_from_the_home_or_says_where_it_looked(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "serving", "--port", "1"],
        cwd=REPO,
        env=serving_env(home=tmp_path / "empty"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and f"looked in the home's runs folder {tmp_path / 'empty' / 'runs'}" in r.stderr


def test_refuses_to_start_without_a_usable_checkpoint(checkpoint, tmp_path):
    def serve(path: Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "serving", "--checkpoint", str(path), "--port", "1"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )

    r = serve(tmp_path / "missing")
    assert r.returncode == 2 and "does not exist" in r.stderr
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "model.json").write_text((checkpoint / "model.json").read_text())
    r = serve(incomplete)
    assert r.returncode == 2 and "incomplete: missing model.safetensors" in r.stderr
    mismatched = tmp_path / "mismatched"
    mismatched.mkdir()
    meta = json.loads((checkpoint / "model.json").read_text())
    meta["architecture"]["columns"] = 1
    (mismatched / "model.json").write_text(json.dumps(meta))
    (mismatched / "model.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="does not match"):
        load_model(mismatched)
    from fastapi.testclient import TestClient

    with pytest.raises(CheckpointError):
        with TestClient(create_app(Settings(checkpoint=mismatched, grpc=False))):
            pass


def test_similar_finds_the_image_itself_first_in_a_shard_set_index(checkpoint, shard_set, sample_root):
    from fastapi.testclient import TestClient

    out, _ = shard_set
    with TestClient(create_app(Settings(checkpoint=checkpoint, index=out, grpc=False))) as client:
        assert client.post("/similar", content=jpeg(), headers={"content-type": "image/jpeg"}).status_code in (200, 409)
        for _ in range(600):  # the index is built in the background
            if client.app.state.indexer.index is not None:
                break
            time.sleep(0.1)
        raw = next((sample_root / "val").glob("*/ILSVRC2012_val_00000002.JPEG"))
        r = client.post("/similar?k=6", content=raw.read_bytes(), headers={"content-type": "image/jpeg"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["index"]["size"] == 99 and len(body["neighbours"]) == 6
        distances = [n["distance"] for n in body["neighbours"]]
        assert distances == sorted(distances)
        # Itself first, as the trainer saw it (float noise only: batched vs single forward).
        assert body["neighbours"][0]["key"] == raw.stem and distances[0] < 0.01 * distances[1]


def test_an_index_is_bounded_and_never_answers_for_another_model(checkpoint, shard_set, sample_root):
    from fastapi.testclient import TestClient

    from serving.predictor import Predictor

    out, _ = shard_set
    with TestClient(create_app(Settings(checkpoint=checkpoint, index=out, max_index_images=10, grpc=False))) as client:
        for _ in range(600):
            if client.get("/index").json()["state"] == "ready":
                break
            time.sleep(0.1)
        assert client.get("/index").json() | {"state": "ready"} == {
            "state": "ready",
            "size": 10,
            "source": out.name,
            "truncated": True,
        }
        image = {"content": jpeg(), "headers": {"content-type": "image/jpeg"}}
        assert client.post("/similar?k=3", **image).status_code == 200
        # A newer model swapped in while the index still holds the old one's embeddings.
        client.app.state.predictor = Predictor(checkpoint, device="cpu")
        r = client.post("/similar?k=3", **image)
        assert r.status_code == 409 and r.json()["error"] == "index_rebuilding", r.text
