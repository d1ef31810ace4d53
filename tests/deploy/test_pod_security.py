"""Every pod of every overlay meets the "restricted" Pod Security Standard (the namespace
enforces it, so a pod that does not would be refused), including the pods KubeRay makes:
the submitter from submitterPodTemplate, and the workers with the `wait-gcs-ready` init
container KubeRay adds (a copy of the Ray container's securityContext). And every container
has a memory limit. Each check is shown to fail on a pod spec that breaks it.

The fields are those of https://kubernetes.io/docs/concepts/security/pod-security-standards/
(baseline + restricted), as the PodSecurity admission plugin reads them."""

from __future__ import annotations

import copy

import pytest

from tests.deploy.k8s import OVERLAYS, by_key, containers, pod_specs, render

RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}


def as_kuberay_makes_it(name: str, spec: dict) -> dict:
    """The pod KubeRay creates from a worker group's template: its `wait-gcs-ready` init
    container copies the Ray container's securityContext (pod.go, DefaultWorkerPodTemplate)."""
    spec = copy.deepcopy(spec)
    if name.startswith("RayJob/") and not name.endswith(("/head", "/submitter")):
        ray = spec["containers"][0]
        wait = {
            "name": "wait-gcs-ready",
            "securityContext": copy.deepcopy(ray.get("securityContext")),
            "resources": {"limits": {"cpu": "200m", "memory": "256Mi"}},
        }
        spec["initContainers"] = [wait] + spec.get("initContainers", [])
    return spec


def restricted_violations(spec: dict) -> list[str]:
    pod = spec.get("securityContext") or {}
    errors = []
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            errors.append(field)
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            errors.append(f"volume {volume['name']}: {sorted(kinds - RESTRICTED_VOLUMES)}")
    for sysctl in pod.get("sysctls", []):
        if sysctl["name"] not in SAFE_SYSCTLS:
            errors.append(f"sysctl {sysctl['name']}")
    if (pod.get("seccompProfile") or {}).get("type") == "Unconfined":
        errors.append("pod seccompProfile Unconfined")
    if pod.get("runAsUser") == 0:
        errors.append("pod runAsUser 0")
    if (pod.get("seLinuxOptions") or {}).get("type", "") not in SELINUX_TYPES:
        errors.append("pod seLinuxOptions type")
    for c in containers(spec) + spec.get("ephemeralContainers", []):
        ctx = c.get("securityContext") or {}
        where = f"container {c['name']}"
        if ctx.get("privileged"):
            errors.append(f"{where}: privileged")
        if ctx.get("allowPrivilegeEscalation") is not False:
            errors.append(f"{where}: allowPrivilegeEscalation is not false")
        caps = ctx.get("capabilities") or {}
        if "ALL" not in caps.get("drop", []):
            errors.append(f"{where}: capabilities do not drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            errors.append(f"{where}: adds capabilities {caps['add']}")
        non_root = ctx.get("runAsNonRoot", pod.get("runAsNonRoot"))
        if non_root is not True:
            errors.append(f"{where}: runAsNonRoot is not true")
        if ctx.get("runAsUser", pod.get("runAsUser")) == 0:
            errors.append(f"{where}: runAsUser 0")
        seccomp = (ctx.get("seccompProfile") or pod.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            errors.append(f"{where}: seccompProfile {seccomp}")
        if ctx.get("procMount", "Default") != "Default":
            errors.append(f"{where}: procMount")
        if (ctx.get("seLinuxOptions") or {}).get("type", "") not in SELINUX_TYPES:
            errors.append(f"{where}: seLinuxOptions type")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            errors.append(f"{where}: hostPort")
    return errors


def memory_violations(spec: dict) -> list[str]:
    """A memory limit on every container, requests within it, and memory-backed emptyDirs
    (/dev/shm) no larger than the limit they are charged to."""
    errors = []
    for c in containers(spec):
        resources = c.get("resources") or {}
        limit = resources.get("limits", {}).get("memory")
        if limit is None:
            errors.append(f"container {c['name']}: no memory limit")
            continue
        request = resources.get("requests", {}).get("memory")
        if request is not None and quantity(request) > quantity(limit):
            errors.append(f"container {c['name']}: memory request {request} > limit {limit}")
    limits = [
        quantity(c["resources"]["limits"]["memory"])
        for c in spec["containers"]
        if (c.get("resources") or {}).get("limits", {}).get("memory")
    ]
    for volume in spec.get("volumes", []):
        empty = volume.get("emptyDir")
        if empty is not None and empty.get("medium") == "Memory":
            if "sizeLimit" not in empty:
                errors.append(f"volume {volume['name']}: memory-backed without sizeLimit")
            elif limits and quantity(empty["sizeLimit"]) > max(limits):
                errors.append(f"volume {volume['name']}: sizeLimit over the container's memory limit")
    return errors


def quantity(text: str | int) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    text = str(text)
    for unit, factor in units.items():
        if text.endswith(unit):
            return float(text[: -len(unit)]) * factor
    return float(text)


def all_pods():
    return [(overlay, name) for overlay in OVERLAYS for name, _ in pod_specs(render(overlay))]


def spec_of(overlay: str, name: str) -> dict:
    return dict(pod_specs(render(overlay)))[name]


@pytest.mark.parametrize("overlay, pod", all_pods())
def test_every_pod_meets_the_restricted_profile(overlay, pod):
    assert restricted_violations(as_kuberay_makes_it(pod, spec_of(overlay, pod))) == []


@pytest.mark.parametrize("overlay, pod", all_pods())
def test_every_container_has_a_memory_limit(overlay, pod):
    assert memory_violations(as_kuberay_makes_it(pod, spec_of(overlay, pod))) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_namespace_enforces_the_restricted_level(overlay):
    (namespace,) = [d for d in render(overlay) if d["kind"] == "Namespace"]
    labels = namespace["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    assert {d["metadata"].get("namespace") for d in render(overlay) if d["kind"] != "Namespace"} == {
        namespace["metadata"]["name"]
    }


def _worker(docs):
    return docs["RayJob/alexnet-train"]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]


BREAKERS = {
    "escalation": lambda d: _worker(d)["containers"][0]["securityContext"].update(allowPrivilegeEscalation=True),
    "capabilities": lambda d: _worker(d)["containers"][0]["securityContext"].pop("capabilities"),
    "seccomp": lambda d: d["Deployment/alexnet-api"]["spec"]["template"]["spec"]["securityContext"].pop(
        "seccompProfile"
    ),
    "non-root": lambda d: d["Job/alexnet-shard"]["spec"]["template"]["spec"]["securityContext"].pop("runAsNonRoot"),
    "hostPath": lambda d: d["Job/alexnet-shard"]["spec"]["template"]["spec"]["volumes"].append(
        {"name": "host", "hostPath": {"path": "/"}}
    ),
    "hostNetwork": lambda d: d["Deployment/alexnet-api"]["spec"]["template"]["spec"].update(hostNetwork=True),
    "no submitter template": lambda d: d["RayJob/alexnet-train"]["spec"].pop("submitterPodTemplate"),
    "init container": lambda d: d["Deployment/alexnet-api"]["spec"]["template"]["spec"]["initContainers"][0].pop(
        "securityContext"
    ),
}


@pytest.mark.parametrize("breaker", BREAKERS)
def test_a_pod_that_breaks_the_restricted_profile_is_caught(breaker):
    docs = render("gpu")
    BREAKERS[breaker](by_key(docs))
    assert any(restricted_violations(as_kuberay_makes_it(name, spec)) for name, spec in pod_specs(docs))


def test_a_container_without_a_memory_limit_is_caught():
    docs = render("gpu")
    keyed = by_key(docs)
    keyed["RayJob/alexnet-train"]["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["resources"]["limits"].pop(
        "memory"
    )
    assert any(memory_violations(spec) for _, spec in pod_specs(docs))
    docs = render("gpu")
    _worker(by_key(docs))["volumes"][2]["emptyDir"]["sizeLimit"] = "1Ti"  # /dev/shm over the limit
    assert any(memory_violations(spec) for _, spec in pod_specs(docs))
