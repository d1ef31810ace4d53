"""The CI and build files name no package registry or mirror (the project's rule): each
comes from the machine (apt's sources for debootstrap, the user's TORCH_INDEX_URL for torch).
The only hosts they may name are this machine's loopback and compose's own services."""

from __future__ import annotations

import re

import yaml

from tests.helpers import REPO

BUILD_FILES = [
    ".ci/run",
    ".ci/compose",
    ".ci/phases.sh",
    "Makefile",
    "deploy/Dockerfile",
    "docker-compose.yml",
    "deploy/compose.gpu.yml",
    "deploy/compose.public.yml",
    "deploy/build-extras/README.md",
]
URL = re.compile(r"\b[a-z][a-z0-9+.-]*://([^/\s\"'`:)$]+)", re.I)


def allowed_hosts() -> set[str]:
    compose = yaml.load((REPO / "docker-compose.yml").read_text(), Loader=yaml.BaseLoader)
    return {"127.0.0.1", "localhost", "0.0.0.0"} | set(compose["services"])


def hosts(text: str) -> set[str]:
    return {m.group(1).lower() for m in URL.finditer(text)}


def test_build_and_ci_files_name_no_registry_or_mirror():
    allowed = allowed_hosts()
    for name in BUILD_FILES + [str(p.relative_to(REPO)) for p in (REPO / ".ci").iterdir()]:
        found = hosts((REPO / name).read_text()) - allowed
        assert not found, f"{name} names {sorted(found)}"


def test_a_mirror_literal_would_be_caught():
    assert hosts("debootstrap bookworm /tmp/rootfs http://deb.example.org/debian") == {"deb.example.org"}
    assert hosts("ARG TORCH_INDEX_URL=https://download.example.org/whl/cpu") == {"download.example.org"}
    assert hosts("JOB_ADDRESS: http://ray-head:8265") <= allowed_hosts()
