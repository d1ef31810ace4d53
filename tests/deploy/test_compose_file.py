"""docker-compose.yml, the GPU override and the Dockerfile, read as files: the secure defaults
and the wiring between services that `.ci/compose` then exercises in a real Docker engine."""

from __future__ import annotations

import re
from dataclasses import fields

import pytest
import yaml

from deploy.job import JobConfig
from tests.pipeline.test_shard import REPO

RAY_SERVICES = ("ray-head", "ray-worker", "job")
LONG_LIVED = ("ray-head", "ray-worker", "api")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())  # resolves the YAML anchors


@pytest.fixture(scope="module")
def gpu() -> dict:
    return yaml.safe_load((REPO / "deploy" / "compose.gpu.yml").read_text())


def published(service: dict) -> list[str]:
    return [str(p) for p in service.get("ports", [])]


def test_only_the_api_is_published_beyond_loopback(compose):
    services = compose["services"]
    for name, service in services.items():
        for port in published(service):
            if name == "api":
                assert port.endswith(":8000"), port
            else:
                # Ray's job API runs whatever it is sent: host loopback only, never 6379/10001.
                assert name == "ray-head" and port.startswith("127.0.0.1:") and port.endswith(":8265"), (name, port)
    assert published(services["api"])


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
    assert services["job"]["depends_on"] == {"ray-head": {"condition": "service_healthy"},
                                             "ray-worker": {"condition": "service_healthy"}}
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
    assert gpu["services"]["job"]["environment"]["JOB_GPUS_PER_WORKER"] == "${GPUS_PER_WORKER:-2}"
    # Its own tag on every service: a GPU build never replaces the CPU image, nor is mixed with it.
    assert {s["image"] for s in gpu["services"].values()} == {"${ALEXNET_IMAGE:-alexnet-2012:gpu}"}
    assert set(gpu["services"]) == {"ray-token", "ray-head", "ray-worker", "job", "api"}


def test_dockerfile_runs_as_a_non_root_user_on_a_public_base_by_default():
    text = (REPO / "deploy" / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.\d+-slim", text, re.M)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    # Certificates and wheels passed in for a build never stay in the image or in git.
    assert "rm -rf /src /tmp/build-extras" in text
    ignored = (REPO / ".gitignore").read_text()
    assert "deploy/build-extras/*.crt" in ignored and "deploy/build-extras/*.whl" in ignored


def test_every_module_the_image_runs_is_copied_into_it(compose):
    text = (REPO / "deploy" / "Dockerfile").read_text()
    copied = set(re.findall(r"deploy/(\w+)\.py", text))
    commands = " ".join(str(s.get("command", "")) for s in compose["services"].values())
    commands += " ".join(str(s["healthcheck"]["test"]) for s in compose["services"].values() if "healthcheck" in s)
    used = set(re.findall(r"deploy\.(\w+)", commands))
    assert used and used <= copied, used - copied
    for module in copied:
        assert (REPO / "deploy" / f"{module}.py").is_file()
