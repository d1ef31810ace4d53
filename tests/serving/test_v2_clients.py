"""The Open Inference Protocol with the ecosystem's own clients, unmodified: Triton's
`tritonclient.http` and `tritonclient.grpc` against the real service (`python -m serving`:
uvicorn, and its gRPC server on its own port) on loopback, with a token. The same images get
the same top-5 over both protocols, as encoded images (BYTES) and as preprocessed FP32
tensors, as they get from POST /predict; no token is 401 / UNAUTHENTICATED; a burst over the
admission bound gets 503 / RESOURCE_EXHAUSTED, and every other call its right answer."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from deploy.steps import free_port
from pipeline.preprocess import DEFAULT_JPEG_QUALITY
from pipeline.sharded import as_sharded
from pipeline.transforms import eval_crops
from tests.helpers import photographs
from tests.serving.helpers import AUTH, TOKEN, encode, jpeg, metric, running_server, serving_env
from trainer.checkpoint import read_meta

grpcclient = pytest.importorskip("tritonclient.grpc")
httpclient = pytest.importorskip("tritonclient.http")
import tritonclient.grpc.aio as grpcaio  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

MODEL = "alexnet"
BURST = 12
# The burst's server: two requests in flight, and a batch that waits 1.5 s to fill, so a burst
# of BURST calls is far over the bound while the first two wait. gRPC's own limits are above
# the burst, so what refuses is the admission bound. (gRPC's call limit answers
# RESOURCE_EXHAUSTED too; streams over the per-connection limit that a client opens before it
# has heard of the limit are reset: UNAVAILABLE, which gRPC clients retry.)
TIGHT = dict(
    token=TOKEN,
    max_in_flight=2,
    max_queue_images=8,
    max_batch=8,
    max_wait_ms=1500,
    take_turns="off",  # the plain max_wait holds the two back (taking turns, a full batch goes at once)
    request_timeout_s=30,
    retry_after_s=2,
    grpc_max_concurrent_rpcs=2 * BURST,
    grpc_max_streams_per_connection=2 * BURST,
)


def images() -> list[bytes]:
    """Real photographs where ../shared/photos is there, else pictures made here."""
    found = photographs(5)
    if found:
        return found
    rng = np.random.default_rng(0)
    from PIL import Image

    noise = [Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)) for _ in range(3)]
    return [jpeg((320, 240), (200, 30, 30)), *(encode(img, "JPEG", quality=90) for img in noise)]


def preprocessed(checkpoint, data: list[bytes]) -> np.ndarray:
    """What a client makes from preprocessing.json (trainer.export): the service's own numbers."""
    meta = read_meta(checkpoint)
    quality = meta.jpeg_quality or DEFAULT_JPEG_QUALITY
    return np.concatenate(
        [eval_crops(as_sharded(d, quality=quality), meta.input_size, meta.normalization) for d in data]
    )


def top5_of_predict(url: str, data: list[bytes]) -> list[list[int]]:
    out = []
    for d in data:
        r = httpx.post(f"{url}/predict", content=d, headers={**AUTH, "content-type": "image/jpeg"}, timeout=60)
        assert r.status_code == 200, r.text
        out.append([p["index"] for p in r.json()["predictions"]])
    return out


@pytest.fixture(scope="module")
def served(checkpoint, tmp_path_factory):
    """(HTTP URL, gRPC address) of the service with a token."""
    folder = tmp_path_factory.mktemp("v2")
    grpc_port = free_port()
    env = serving_env(token=TOKEN, max_wait_ms=20)
    with running_server(["--checkpoint", str(checkpoint), "--grpc-port", str(grpc_port)], folder / "log", env) as url:
        yield url, f"127.0.0.1:{grpc_port}"


@pytest.fixture(scope="module")
def reference(served):
    data = images()
    return data, top5_of_predict(served[0], data)


def bytes_input(module, data: list[bytes]):
    tensor = module.InferInput("image", [len(data)], "BYTES")
    tensor.set_data_from_numpy(np.array(data, dtype=np.object_))
    return tensor


def fp32_input(module, crops: np.ndarray):
    tensor = module.InferInput("input", list(crops.shape), "FP32")
    tensor.set_data_from_numpy(crops)
    return tensor


def test_health_and_metadata_over_http_and_grpc(served, checkpoint):
    url, address = served
    http = httpclient.InferenceServerClient(url.removeprefix("http://"))
    grpc = grpcclient.InferenceServerClient(address)
    epoch = str(read_meta(checkpoint).epoch)
    size = read_meta(checkpoint).input_size
    # Liveness and readiness need no token (probes), as /health and /ready.
    assert http.is_server_live() and http.is_server_ready() and http.is_model_ready(MODEL)
    assert grpc.is_server_live() and grpc.is_server_ready() and grpc.is_model_ready(MODEL)
    assert not http.is_model_ready("resnet")  # 404
    over_http = http.get_model_metadata(MODEL, headers=dict(AUTH))
    over_grpc = grpc.get_model_metadata(MODEL, headers=dict(AUTH), as_json=True)
    for meta in (over_http, over_grpc):
        assert meta["name"] == MODEL and meta["versions"] == [epoch] and meta["platform"] == "pytorch"
        inputs = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"]}
        assert inputs == {"image": ("BYTES", [-1]), "input": ("FP32", [-1, 3, size, size])}
        outputs = {t["name"]: t["datatype"] for t in meta["outputs"]}
        assert outputs == {
            "top_k_indices": "INT64",
            "top_k_wnids": "BYTES",
            "top_k_probabilities": "FP32",
            "logits": "FP32",
        }
    # The standard gRPC health service, as a load balancer probes it: no token.
    import grpc as grpclib
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpclib.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_tritonclient_http_gets_the_top5_of_predict_from_images_and_tensors(served, reference, checkpoint):
    url, _ = served
    data, expected = reference
    client = httpclient.InferenceServerClient(url.removeprefix("http://"))
    wanted = [httpclient.InferRequestedOutput(n) for n in ("top_k_indices", "top_k_wnids", "logits")]
    for tensor in (bytes_input(httpclient, data), fp32_input(httpclient, preprocessed(checkpoint, data))):
        result = client.infer(MODEL, [tensor], outputs=wanted, headers=dict(AUTH))
        indices = result.as_numpy("top_k_indices")
        assert indices.tolist() == expected, tensor.name()
        classes = [c["wnid"].encode() for c in read_meta(checkpoint).classes]
        assert result.as_numpy("top_k_wnids").tolist() == [[classes[i] for i in row] for row in expected]
        logits = result.as_numpy("logits")
        assert logits.shape == (len(data), len(classes))
        assert np.argsort(-logits, axis=1)[:, :5].tolist() == expected
    # Without a list of outputs: the three top-k ones, all as binary data (Triton's default).
    plain = client.infer(MODEL, [bytes_input(httpclient, data)], headers=dict(AUTH))
    assert plain.as_numpy("top_k_indices").tolist() == expected and plain.as_numpy("logits") is None
    probabilities = plain.as_numpy("top_k_probabilities")
    assert probabilities.dtype == np.float32 and np.all(np.diff(probabilities, axis=1) <= 0)


def test_tritonclient_grpc_gets_the_top5_of_predict_from_images_and_tensors(served, reference, checkpoint):
    _, address = served
    data, expected = reference
    client = grpcclient.InferenceServerClient(address)
    for tensor in (bytes_input(grpcclient, data), fp32_input(grpcclient, preprocessed(checkpoint, data))):
        result = client.infer(MODEL, [tensor], headers=dict(AUTH))
        assert result.as_numpy("top_k_indices").tolist() == expected, tensor.name()
        assert result.get_response().model_version == str(read_meta(checkpoint).epoch)
    three = client.infer(
        MODEL,
        [bytes_input(grpcclient, data[:1])],
        outputs=[grpcclient.InferRequestedOutput("top_k_probabilities"), grpcclient.InferRequestedOutput("logits")],
        parameters={"top_k": 3},
        headers=dict(AUTH),
    )
    assert three.as_numpy("top_k_probabilities").shape == (1, 3) and three.as_numpy("top_k_indices") is None
    assert np.argsort(-three.as_numpy("logits"), axis=1)[:, :3].tolist() == [expected[0][:3]]


def test_without_the_token_http_is_401_and_grpc_unauthenticated(served, reference):
    url, address = served
    data, _ = reference
    http = httpclient.InferenceServerClient(url.removeprefix("http://"))
    grpc = grpcclient.InferenceServerClient(address)
    wrong = {"authorization": "Bearer not-the-token"}
    for headers in (None, wrong):
        with pytest.raises(InferenceServerException) as refused:
            http.infer(MODEL, [bytes_input(httpclient, data[:1])], headers=dict(headers or {}))
        assert refused.value.status() == "401" and "bearer token" in refused.value.message()
        with pytest.raises(InferenceServerException) as refused:
            http.get_model_metadata(MODEL, headers=dict(headers or {}))
        assert refused.value.status() == "401"
        with pytest.raises(InferenceServerException) as refused:
            grpc.infer(MODEL, [bytes_input(grpcclient, data[:1])], headers=dict(headers or {}))
        assert refused.value.status() == "StatusCode.UNAUTHENTICATED" and "bearer token" in refused.value.message()
        with pytest.raises(InferenceServerException) as refused:
            grpc.get_model_metadata(MODEL, headers=dict(headers or {}))
        assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
    assert metric(url, "alexnet_requests_total", 'endpoint="grpc ModelInfer",status="UNAUTHENTICATED"') == 2


def test_grpc_errors_are_status_codes_with_the_reason(served, reference):
    _, address = served
    data, _ = reference
    client = grpcclient.InferenceServerClient(address)

    def status(call) -> tuple[str, str]:
        with pytest.raises(InferenceServerException) as failed:
            call()
        return failed.value.status(), failed.value.message()

    code, why = status(lambda: client.infer("resnet", [bytes_input(grpcclient, data[:1])], headers=dict(AUTH)))
    assert code == "StatusCode.NOT_FOUND" and "alexnet" in why
    code, why = status(
        lambda: client.infer(MODEL, [bytes_input(grpcclient, data[:1])], model_version="999", headers=dict(AUTH))
    )
    assert code == "StatusCode.NOT_FOUND" and "version" in why
    broken = grpcclient.InferInput("image", [2], "BYTES")
    broken.set_data_from_numpy(np.array([data[0], b"not an image"], dtype=np.object_))
    code, why = status(lambda: client.infer(MODEL, [broken], headers=dict(AUTH)))
    assert code == "StatusCode.INVALID_ARGUMENT" and why.startswith("image[1]:")
    wrong = grpcclient.InferInput("input", [1, 3, 8, 8], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 3, 8, 8), dtype=np.float32))
    code, why = status(lambda: client.infer(MODEL, [wrong], headers=dict(AUTH)))
    assert code == "StatusCode.INVALID_ARGUMENT" and "shape" in why


@pytest.fixture(scope="module")
def tight(checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("v2-tight")
    grpc_port = free_port()
    with running_server(
        ["--checkpoint", str(checkpoint), "--grpc-port", str(grpc_port)], folder / "log", serving_env(**TIGHT)
    ) as url:
        yield url, f"127.0.0.1:{grpc_port}"


def refusals(url: str) -> float:
    return sum(metric(url, "alexnet_rejected_requests_total", f'reason="{r}"') for r in ("in_flight", "queue_full"))


def test_a_burst_over_the_admission_bound_is_refused_at_once_and_nothing_is_lost(tight, reference):
    """BURST calls at once, over each protocol, to a server that takes two: every call gets
    its right top-5 or 503 / RESOURCE_EXHAUSTED (with Retry-After), none is lost or wrong, the
    refusals are counted, and afterwards nothing is left in flight and a call is served."""
    url, address = tight
    data, expected = reference
    image, top5 = data[:1], expected[0]
    before = refusals(url)

    http = httpclient.InferenceServerClient(url.removeprefix("http://"), concurrency=BURST)
    pending = [http.async_infer(MODEL, [bytes_input(httpclient, image)], headers=dict(AUTH)) for _ in range(BURST)]
    answers = []
    for call in pending:
        try:
            answers.append(call.get_result().as_numpy("top_k_indices").tolist())
        except InferenceServerException as exc:
            answers.append(exc.status())
    ok = [a for a in answers if a != "503"]
    assert all(a == [top5] for a in ok), answers  # every answer right
    assert len(ok) >= 1 and answers.count("503") >= BURST // 2, answers
    assert refusals(url) - before == answers.count("503")  # each refusal counted, by the admission bound

    async def grpc_burst():
        async with grpcaio.InferenceServerClient(address) as client:
            calls = [client.infer(MODEL, [bytes_input(grpcclient, image)], headers=dict(AUTH)) for _ in range(BURST)]
            return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(grpc_burst())
    good = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, BaseException)]
    assert all(r.as_numpy("top_k_indices").tolist() == [top5] for r in good)
    assert all(isinstance(r, InferenceServerException) for r in refused), refused
    assert {r.status() for r in refused} == {"StatusCode.RESOURCE_EXHAUSTED"}, [
        (r.status(), r.message()) for r in refused
    ]
    assert len(good) >= 1 and len(refused) >= BURST // 2
    assert all("in flight" in r.message() or "is full" in r.message() for r in refused)  # the admission bound's
    assert refusals(url) - before == answers.count("503") + len(refused)  # counted too

    assert metric(url, "alexnet_in_flight_requests") == 0 and metric(url, "alexnet_queue_images") == 0
    after = grpcclient.InferenceServerClient(address).infer(MODEL, [bytes_input(grpcclient, image)], headers=dict(AUTH))
    assert after.as_numpy("top_k_indices").tolist() == [top5]
