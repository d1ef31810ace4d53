"""The public edge as deployed: compose and Kubernetes put nothing in front of the API but
`python -m serving`, which carries the edge's limits itself (header and body deadlines, the
per-address and total connection bounds, bodies admitted before model capacity:
serving.edge, tests/serving/test_slow_clients.py; on its gRPC port, gRPC's own bounds on
messages, calls, streams, connections and idle time: serving.oip.grpc_server); the settings
the deployments give it keep those limits in force, and the API's memory limit holds the
worst case they allow.

Should a proxy or an ingress ever front the API in deploy/, these tests fail until it is
given the same limits (deploy/README.md, "Slow clients": behind a proxy every client has
the proxy's address, so the proxy must bound clients by their own)."""

from __future__ import annotations

import re

import pytest

from serving.settings import ENV_PREFIX, MiB, Settings
from tests.deploy.k8s import OVERLAYS, by_key, containers, render
from tests.deploy.test_compose_file import load

GiB = 1024 * MiB
# The serving process with the model loaded, before any request (533 MB RSS measured,
# docs/benchmarks.md), with room to spare.
MODEL_PROCESS_BYTES = 640 * MiB
FC7_BYTES = 4096 * 4  # one image in the /similar index
# Images in the validation split each deployment indexes for /similar by default.
INDEXED = {"compose": 1_000, "cpu-demo": 1_000, "gpu": 50_000}  # the sample's val split; ILSVRC-2012's
# Settings that name files or folders, not limits (a token file must exist to be read).
NOT_LIMITS = {"TOKEN_FILE", "INDEX", "CHECKPOINT", "INDEX_ROOTS"}
PROXIES = re.compile(r"nginx|envoy|traefik|haproxy|caddy|oauth2-proxy", re.IGNORECASE)


def served_with(env: dict[str, str]) -> Settings:
    """The Settings `python -m serving` would run with under `env` (ALEXNET_* variables)."""
    limits = {
        k[len(ENV_PREFIX) :].lower(): v
        for k, v in env.items()
        if k.startswith(ENV_PREFIX) and k[len(ENV_PREFIX) :] not in NOT_LIMITS
    }
    return Settings(_env_file=None, **limits)


def memory_bytes(quantity: str) -> int:
    """A compose (2g) or Kubernetes (2Gi, 4096Mi) memory quantity."""
    m = re.fullmatch(r"(\d+)\s*([kmgKMG])i?[bB]?", quantity)
    assert m, quantity
    return int(m[1]) * {"k": 1024, "m": MiB, "g": GiB}[m[2].lower()]


def assert_holds(settings: Settings, limit: int, indexed: int, where: str) -> None:
    need = MODEL_PROCESS_BYTES + settings.worst_case_request_bytes + min(indexed, settings.max_index_images) * FC7_BYTES
    assert need <= limit, f"{where}: {need / GiB:.2f} GiB at worst, over the {limit / GiB:.2f} GiB limit"


def assert_edge_in_force(settings: Settings, where: str) -> None:
    # One address cannot hold every connection, nor every byte of the body budget.
    assert settings.max_connections_per_client < settings.max_connections, where
    assert settings.max_connections_per_client * settings.max_upload_bytes < settings.max_body_memory_bytes, where
    # Deadlines a slow client cannot stretch into minutes.
    assert settings.header_timeout_s <= 60 and settings.body_timeout_s <= 120, where
    if settings.grpc:  # gRPC has no per-address bound: its own bounds must hold instead
        # One connection cannot hold every call; an idle one is closed within minutes, and a
        # client cannot make the server answer pings in a loop.
        assert settings.grpc_max_streams_per_connection < settings.grpc_max_concurrent_rpcs, where
        assert settings.grpc_idle_timeout_s <= 600 and settings.grpc_min_ping_interval_s >= 10, where
        # A message sent slowly holds a call until its connection's age and grace, no longer.
        assert settings.grpc_max_connection_age_s + settings.body_timeout_s <= 300, where
        # Whole messages gRPC may hold at once stay within what the API's memory limit counts
        # (worst_case_request_bytes) and no larger than the bodies HTTP may hold.
        assert settings.grpc_max_concurrent_rpcs * settings.max_upload_bytes <= settings.max_body_memory_bytes, where


def compose_env(*files: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for name in files:
        env.update(load(name)["services"]["api"].get("environment", {}))
    return env


@pytest.mark.parametrize(
    "files", [("docker-compose.yml",), ("docker-compose.yml", "deploy/compose.public.yml")], ids=["loopback", "public"]
)
def test_compose_serves_the_api_itself_with_the_edge_in_force(files):
    for name in files:
        for service, spec in load(name)["services"].items():
            assert not PROXIES.search(str(spec.get("image", "")) + str(spec.get("command", ""))), (name, service)
    api = load("docker-compose.yml")["services"]["api"]
    assert api["command"].split()[:3] == ["python", "-m", "serving"]
    for name in files:  # HTTP and gRPC are both published from the API's own container
        ports = load(name)["services"]["api"]["ports"]
        assert sorted(str(p).rsplit(":", 1)[1] for p in ports) == ["8000", "8001"], (name, ports)
    settings = served_with(compose_env(*files))
    assert_edge_in_force(settings, "compose")
    default_limit = re.fullmatch(r"\$\{API_MEMORY:-(\w+)\}", api["deploy"]["resources"]["limits"]["memory"])[1]
    assert_holds(settings, memory_bytes(default_limit), INDEXED["compose"], "compose api")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubernetes_serves_the_api_itself_with_the_edge_in_force(overlay):
    docs = render(overlay)
    assert not [d for d in docs if d["kind"] in ("Ingress", "Gateway", "HTTPRoute")], (
        "an ingress fronts the API: give it the edge's limits (deploy/README.md) and test them here"
    )
    deployment = by_key(docs)["Deployment/alexnet-api"]
    spec = deployment["spec"]["template"]["spec"]
    (api,) = spec["containers"]  # no proxy sidecar: the Service reaches uvicorn itself
    assert api["command"][:3] == ["python", "-m", "serving"]
    service = by_key(docs)["Service/alexnet-api"]
    assert [p["targetPort"] for p in service["spec"]["ports"]] == [p["name"] for p in api["ports"]]
    settings = served_with({e["name"]: e["value"] for e in api.get("env", []) if "value" in e})
    assert_edge_in_force(settings, overlay)
    assert_holds(settings, memory_bytes(api["resources"]["limits"]["memory"]), INDEXED[overlay], f"{overlay} api")
    for c in containers(spec):
        assert not PROXIES.search(c["image"]), c["name"]


def test_a_memory_limit_below_the_worst_case_is_caught():
    big = Settings(_env_file=None, max_body_memory_bytes=2 * GiB)
    with pytest.raises(AssertionError, match="at worst"):
        assert_holds(big, 2 * GiB, 0, "test")
    with pytest.raises(AssertionError):
        assert_edge_in_force(Settings(_env_file=None, max_connections_per_client=512), "test")
    with pytest.raises(AssertionError):  # one gRPC connection could hold every call
        assert_edge_in_force(Settings(_env_file=None, grpc_max_streams_per_connection=16), "test")
    with pytest.raises(AssertionError, match="at worst"):  # gRPC's whole messages counted too
        assert_holds(Settings(_env_file=None, grpc_max_concurrent_rpcs=64), 2 * GiB, 0, "test")
