"""docker-compose.yml, the GPU override and the Dockerfile, read as files: the secure defaults
and the wiring between services that `.ci/compose` then exercises in a real Docker engine."""

from __future__ import annotations

import re
from dataclasses import fields

import pytest
import yaml

from deploy.job import JobConfig
from tests.deploy.dockerfile import build_targets, stages
from tests.helpers import REPO

RAY_SERVICES = ("ray-head", "ray-worker", "job")
LONG_LIVED = ("ray-head", "ray-worker", "api", "tensorboard")


class ComposeLoader(yaml.SafeLoader):
    """YAML as compose reads it, with its merge tags (`!override`, `!reset`) kept visible."""


class Tagged(list):
    def __init__(self, tag, items):
        super().__init__(items)
        self.tag = tag


for _tag in ("!override", "!reset"):
    ComposeLoader.add_constructor(_tag, lambda loader, node: Tagged(node.tag, loader.construct_sequence(node)))


def load(name: str) -> dict:
    return yaml.load((REPO / name).read_text(), Loader=ComposeLoader)  # resolves the YAML anchors


@pytest.fixture(scope="module")
def compose() -> dict:
    return load("docker-compose.yml")


@pytest.fixture(scope="module")
def gpu() -> dict:
    return load("deploy/compose.gpu.yml")


@pytest.fixture(scope="module")
def public() -> dict:
    return load("deploy/compose.public.yml")


def published(service: dict) -> list[str]:
    return [str(p) for p in service.get("ports", [])]


def test_nothing_is_published_beyond_loopback(compose):
    services = compose["services"]
    for name, service in services.items():
        for port in published(service):
            # Ray's job API runs whatever it is sent, and the API has no token by default:
            # host loopback only; never 6379 (GCS) or 10001 (Ray client).
            assert port.startswith("127.0.0.1:"), (name, port)
            assert (name, port.rsplit(":", 1)[1]) in {
                ("ray-head", "8265"),
                ("api", "8000"),
                ("api", "8001"),
                ("tensorboard", "6006"),
            }, (name, port)
    assert published(services["api"])
    assert "ALEXNET_TOKEN" not in services["api"]["environment"]  # an empty token must not reach it


def test_the_public_override_needs_a_token_file(compose, public):
    api = public["services"]["api"]
    # It replaces the loopback port (compose would otherwise add one to the other)...
    assert api["ports"].tag == "!override" and [p.split(":")[0] for p in api["ports"]] == ["${API_BIND"] * 2
    assert [p.split(":")[-1].split()[0] for p in api["ports"]] == ["8000", "8001"]  # HTTP and gRPC
    # ...and hands the API a token as a file, from a compose secret that must be given.
    assert api["environment"] == {"ALEXNET_TOKEN_FILE": "/run/secrets/api-token"}
    assert api["secrets"] == ["api-token"]
    assert public["secrets"]["api-token"]["file"].startswith("${API_TOKEN_FILE:?")


def test_every_service_is_hardened_and_the_api_memory_bounded(compose, gpu):
    for name, service in compose["services"].items():
        assert service["cap_drop"] == ["ALL"], name
        assert service["security_opt"] == ["no-new-privileges:true"], name
        assert service["read_only"] is True and "/tmp" in service["tmpfs"], name
    api = compose["services"]["api"]
    assert re.fullmatch(r"\$\{API_MEMORY:-\d+g\}", api["deploy"]["resources"]["limits"]["memory"])
    assert gpu["services"]["api"]["deploy"]["resources"]["limits"]["memory"].startswith("${API_MEMORY:-")
    # Under the GPU override only the services holding GPUs get a writable root.
    assert {n for n, s in gpu["services"].items() if s.get("read_only") is False} == {"ray-worker", "api"}


def test_ray_token_auth_everywhere_ray_runs(compose):
    services = compose["services"]
    for name in RAY_SERVICES:
        env = services[name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token", name
        assert env["RAY_AUTH_TOKEN_PATH"] == "/secrets/ray/auth_token", name
        assert "ray-auth:/secrets/ray:ro" in services[name]["volumes"], name
    # The token is made once, by its own service, before the head starts.
    assert services["ray-token"]["command"][-1] == "/secrets/ray/auth_token"
    assert services["ray-head"]["depends_on"]["ray-token"]["condition"] == "service_completed_successfully"


def test_healthchecks_and_quick_stops(compose):
    for name, service in compose["services"].items():
        assert "stop_grace_period" in service, name
        if name in LONG_LIVED:
            test = service["healthcheck"]["test"]
            assert test[:4] == ["CMD", "python", "-m", "deploy.healthcheck"], name
            assert service["restart"] == "unless-stopped", name
        else:
            assert service["restart"] == "no", name


def test_the_api_waits_for_training_and_the_job_for_the_cluster(compose):
    services = compose["services"]
    assert services["api"]["depends_on"] == {"job": {"condition": "service_completed_successfully"}}
    assert services["job"]["depends_on"] == {
        "ray-head": {"condition": "service_healthy"},
        "ray-worker": {"condition": "service_healthy"},
    }
    # The api serves the run the job trains.
    assert "--checkpoint /runs/${RUN_NAME:-compose}" in services["api"]["command"]
    assert services["job"]["environment"]["JOB_NAME"] == "${RUN_NAME:-compose}"


def test_job_environment_names_are_job_config_fields(compose):
    names = {"JOB_" + f.name.upper() for f in fields(JobConfig)}
    job_env = {k for k in compose["services"]["job"]["environment"] if k.startswith("JOB_")}
    assert job_env <= names, job_env - names


def test_ray_nodes_share_the_data_and_run_volumes(compose):
    for name in ("ray-head", "ray-worker", "job"):
        volumes = compose["services"][name]["volumes"]
        assert "data:/data" in volumes and "runs:/runs" in volumes, name
    # Training runs on the workers: the head offers no CPUs.
    assert "--num-cpus=0" in compose["services"]["ray-head"]["command"]


def test_gpu_override_gives_the_workers_gpus_in_pairs(gpu):
    worker = gpu["services"]["ray-worker"]
    device = worker["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    job = gpu["services"]["job"]["environment"]  # the layout resolved from the GPUs (trainer.layout)
    assert job["JOB_GPUS_PER_WORKER"] == "${GPUS_PER_WORKER:-auto}" and job["JOB_WORKERS"] == "${TRAIN_WORKERS:-auto}"
    # Its own tag on every service: a GPU build never replaces the CPU image, nor is mixed with it.
    assert {s["image"] for s in gpu["services"].values()} == {"${ALEXNET_IMAGE:-alexnet-2012:gpu}"}
    assert set(gpu["services"]) == {"ray-token", "ray-head", "ray-worker", "job", "api"}


def test_images_are_built_from_their_dockerfile_target(compose, gpu):
    targets = build_targets()
    assert compose["services"]["ray-token"]["build"]["target"] == "cpu" in targets
    assert gpu["services"]["ray-token"]["build"]["target"] == "gpu" in targets
    assert compose["x-app"]["image"].endswith(":cpu}") and gpu["x-gpu-image"]["image"].endswith(":gpu}")


def test_dockerfile_runs_as_a_non_root_user_on_a_public_base_by_default():
    text = (REPO / "deploy" / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.\d+-slim", text, re.M)
    # Every target ends as the non-root user (a stage inherits its parent stage's USER).
    all_stages = stages()

    def user(name: str) -> str | None:
        stage = all_stages.get(name)
        if stage is None:
            return None  # a base image: root
        own = stage.instructions("USER")
        return own[-1] if own else user(stage.parent)

    for target in ("cpu", "gpu"):
        assert user(target) not in (None, "root", "0"), target
    ignored = (REPO / ".gitignore").read_text()
    assert "deploy/build-extras/*.crt" in ignored and "deploy/build-extras/*.whl" in ignored


def test_build_extras_reach_only_the_build_stage():
    """Certificates and wheels passed in for a build are copied into the `build` stage only;
    the targets take its virtual environment and nothing else (.ci/compose also checks the
    built image's layers)."""
    all_stages = stages()
    with_extras = {
        name
        for name, st in all_stages.items()
        if any("build-extras" in i for i in st.instructions("COPY") + st.instructions("ADD"))
    }
    assert with_extras == {"build"}
    assert not [name for name, st in all_stages.items() if st.parent == "build"]  # nothing built on top of it
    for target in ("cpu", "gpu"):
        for copy in all_stages[target].instructions("COPY") + all_stages[target].instructions("ADD"):
            assert copy == "--from=build /opt/venv /opt/venv", (target, copy)


def test_every_module_the_image_runs_is_copied_into_it(compose):
    text = (REPO / "deploy" / "Dockerfile").read_text()
    copied = set(re.findall(r"deploy/(\w+)\.py", text))
    commands = " ".join(str(s.get("command", "")) for s in compose["services"].values())
    commands += " ".join(str(s["healthcheck"]["test"]) for s in compose["services"].values() if "healthcheck" in s)
    used = set(re.findall(r"deploy\.(\w+)", commands))
    assert used and used <= copied, used - copied
    for module in copied:
        assert (REPO / "deploy" / f"{module}.py").is_file()


def test_tensorboard_is_an_optional_service_on_loopback_reading_the_runs(compose):
    tensorboard = compose["services"]["tensorboard"]
    assert tensorboard["profiles"] == ["tensorboard"]  # not started by a plain `docker compose up`
    assert tensorboard["command"][:3] == ["tensorboard", "--logdir", "/runs"]
    assert tensorboard["volumes"] == ["runs:/runs:ro"]  # the run folders, read-only; no Ray token, no data
    assert published(tensorboard) == ["127.0.0.1:${TENSORBOARD_PORT:-6006}:6006"]
    assert {n for n, s in compose["services"].items() if s.get("profiles")} == {"tensorboard"}
