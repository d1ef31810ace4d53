"""The KubeRay operator's own rules for a RayJob, the ones a CRD schema cannot express and
which the operator checks before it creates anything (ray-operator/controllers/ray/utils/
validation.go, v1.5.1 to v1.7.0): a RayJob that breaks one ends in ValidationFailed and no
cluster starts. Each rule holds for every overlay, and fails on a manifest that breaks it.
Plus what KubeRay does with the pod specs that the image has to fit (probes, GPUs)."""

from __future__ import annotations

import copy
import re

import pytest

from tests.deploy.k8s import OVERLAYS, containers, rayjob, render

MAX_RAYJOB_NAME = 53 - 6  # MaxRayClusterNameLength - 6
TOKEN_AUTH_MIN_RAY = (2, 52, 0)
RESOURCE_PARAMS = ("num-cpus", "num-gpus", "memory", "resources")


def version(text: str) -> tuple[int, ...] | None:
    m = re.fullmatch(r"v?(\d+)\.(\d+)(?:\.(\d+))?(?:[-+].*)?", text)  # k8s.io/apimachinery ParseGeneric
    return tuple(int(g or 0) for g in m.groups()) if m else None


def rule_name(job: dict) -> list[str]:
    """ValidateRayJobMetadata: a DNS-1035 label short enough for the cluster's name."""
    name = job["metadata"]["name"]
    errors = []
    if len(name) > MAX_RAYJOB_NAME:
        errors.append(f"name {name!r} is longer than {MAX_RAYJOB_NAME}")
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 63:
        errors.append(f"name {name!r} is not a DNS-1035 label")
    return errors


def rule_token_auth_needs_ray_version(job: dict) -> list[str]:
    """ValidateRayClusterSpec: authOptions.mode token needs rayVersion >= 2.52.0."""
    cluster = job["spec"]["rayClusterSpec"]
    if cluster.get("authOptions", {}).get("mode") != "token":
        return []
    raw = cluster.get("rayVersion", "")
    if not raw:
        return ["authOptions.mode is 'token' but rayVersion is not set"]
    parsed = version(str(raw))
    if parsed is None:
        return [f"rayVersion {raw!r} is not a version"]
    if parsed < TOKEN_AUTH_MIN_RAY:
        return [f"token auth needs Ray 2.52.0 or later, rayVersion is {raw}"]
    return []


def rule_head_group(job: dict) -> list[str]:
    """ValidateRayClusterSpec: a head group with at least one container."""
    head = job["spec"]["rayClusterSpec"].get("headGroupSpec")
    if not head or not head.get("template", {}).get("spec", {}).get("containers"):
        return ["headGroupSpec should have at least one container"]
    return []


def rule_worker_groups(job: dict) -> list[str]:
    """ValidateRayClusterSpec (v1.6+) and GetWorkerGroupDesiredReplicas: each group has a
    container, minReplicas and maxReplicas without autoscaling, 0 <= min <= max; and, since
    KubeRay silently clamps replicas into [min, max] (the training would then wait for
    workers that never come), replicas within them."""
    cluster = job["spec"]["rayClusterSpec"]
    autoscaling = cluster.get("enableInTreeAutoscaling", False)
    errors = []
    for group in cluster.get("workerGroupSpecs", []):
        name = group.get("groupName")
        if not group.get("template", {}).get("spec", {}).get("containers"):
            errors.append(f"worker group {name} has no container")
        lo, hi, n = group.get("minReplicas"), group.get("maxReplicas"), group.get("replicas")
        if not autoscaling and (lo is None or hi is None):
            errors.append(f"worker group {name} must set both minReplicas and maxReplicas")
            continue
        if (lo is not None and lo < 0) or (hi is not None and hi < 0):
            errors.append(f"worker group {name} has negative min/maxReplicas")
        elif lo is not None and hi is not None and lo > hi:
            errors.append(f"worker group {name} has minReplicas {lo} greater than maxReplicas {hi}")
        elif n is not None and lo is not None and hi is not None and not lo <= n <= hi:
            errors.append(f"worker group {name} has replicas {n} outside [{lo}, {hi}]")
    return errors


def rule_resources_set_once(job: dict) -> list[str]:
    """validateRayGroupResources / validateRayGroupLabels: no resource in both rayStartParams
    and the group's `resources`; no rayStartParams['labels']."""
    cluster = job["spec"]["rayClusterSpec"]
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])]
    errors = []
    for name, group in groups:
        params = group.get("rayStartParams", {})
        if any(params.get(k) for k in RESOURCE_PARAMS) and group.get("resources"):
            errors.append(f"{name}: resources set in both rayStartParams and resources")
        if "labels" in params:
            errors.append(f"{name}: rayStartParams['labels'] is not supported")
    return errors


def rule_gpus_as_nvidia_gpu(job: dict) -> list[str]:
    """GPUs as the extended resource `nvidia.com/gpu` in the Ray container's limits, from
    which KubeRay sets `ray start --num-gpus` (IsGPUResourceKey: any key ending in "gpu");
    not also as rayStartParams num-gpus; requests, if given, equal to the limits (Kubernetes'
    rule for extended resources)."""
    cluster = job["spec"]["rayClusterSpec"]
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])]
    errors = []
    for name, group in groups:
        for c in containers(group["template"]["spec"]):
            resources = c.get("resources", {})
            for where in ("limits", "requests"):
                for key in resources.get(where, {}):
                    if key.endswith("gpu") and key != "nvidia.com/gpu":
                        errors.append(f"{name}/{c['name']}: GPUs as {key!r}, not nvidia.com/gpu")
            limit = resources.get("limits", {}).get("nvidia.com/gpu")
            request = resources.get("requests", {}).get("nvidia.com/gpu")
            if request is not None and request != limit:
                errors.append(f"{name}/{c['name']}: nvidia.com/gpu requests {request} != limits {limit}")
        if "num-gpus" in group.get("rayStartParams", {}):
            errors.append(f"{name}: num-gpus in rayStartParams (KubeRay takes it from nvidia.com/gpu)")
    return errors


def rule_ray_containers_have_probes(job: dict) -> list[str]:
    """KubeRay gives a Ray container without probes its own, which call `wget`: the image
    has none, so the head would never be ready. Ours call deploy.healthcheck."""
    cluster = job["spec"]["rayClusterSpec"]
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])]
    return [
        f"{name}: the Ray container lacks its {probe}"
        for name, group in groups
        for probe in ("readinessProbe", "livenessProbe")
        if probe not in group["template"]["spec"]["containers"][0]
    ]


def rule_job_spec(job: dict) -> list[str]:
    """ValidateRayJobSpec: the settings this RayJob uses, within their bounds; and the
    submitter is a Kubernetes Job, whose pods restart Never or OnFailure."""
    spec = job["spec"]
    errors = []
    if not spec.get("entrypoint", "").strip():
        errors.append("no entrypoint")
    if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
        errors.append("suspend needs shutdownAfterJobFinishes")
    if spec.get("ttlSecondsAfterFinished", 0) < 0:
        errors.append("ttlSecondsAfterFinished must be >= 0")
    if spec.get("backoffLimit", 0) < 0:
        errors.append("backoffLimit must be >= 0")
    if "activeDeadlineSeconds" in spec and spec["activeDeadlineSeconds"] <= 0:
        errors.append("activeDeadlineSeconds must be > 0")
    if spec.get("submissionMode", "K8sJobMode") != "K8sJobMode":
        errors.append(f"submissionMode {spec['submissionMode']}: this project submits from a Job")
    restart = spec.get("submitterPodTemplate", {}).get("spec", {}).get("restartPolicy", "Never")
    if restart not in ("Never", "OnFailure"):
        errors.append(f"the submitter's restartPolicy {restart} is not allowed in a Job")
    return errors


def _drop_ray_version(job):
    del job["spec"]["rayClusterSpec"]["rayVersion"]


def _old_ray_version(job):
    job["spec"]["rayClusterSpec"]["rayVersion"] = "2.51.1"


def _no_head_container(job):
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"] = []


def _min_over_max(job):
    group = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    group["minReplicas"], group["maxReplicas"] = group["maxReplicas"] + 1, group["maxReplicas"]


def _no_max(job):
    del job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"]


def _replicas_over_max(job):
    group = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    group["replicas"] = group["maxReplicas"] + 1


def _resources_twice(job):
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["resources"] = {"CPU": "1"}  # head has num-cpus: "0"


def _gpu_key(job):
    limits = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"][
        "limits"
    ]
    limits["gpu"] = 2


def _num_gpus_param(job):
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["rayStartParams"]["num-gpus"] = "2"


def _no_probe(job):
    del job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["readinessProbe"]


def _long_name(job):
    job["metadata"]["name"] = "alexnet-train-" + "x" * 40


def _restart_always(job):
    job["spec"]["submitterPodTemplate"]["spec"]["restartPolicy"] = "Always"


RULES = {
    rule_name: [_long_name],
    rule_token_auth_needs_ray_version: [_drop_ray_version, _old_ray_version],
    rule_head_group: [_no_head_container],
    rule_worker_groups: [_min_over_max, _no_max, _replicas_over_max],
    rule_resources_set_once: [_resources_twice],
    rule_gpus_as_nvidia_gpu: [_gpu_key, _num_gpus_param],
    rule_ray_containers_have_probes: [_no_probe],
    rule_job_spec: [_restart_always],
}


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.__name__)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kuberay_accepts_the_rayjob(overlay, rule):
    assert rule(rayjob(render(overlay))) == []


@pytest.mark.parametrize("rule, breaker", [(r, b) for r, bs in RULES.items() for b in bs], ids=lambda x: x.__name__)
def test_the_rule_refuses_a_rayjob_that_breaks_it(rule, breaker):
    job = rayjob(render("gpu"))
    assert rule(job) == []
    broken = copy.deepcopy(job)
    breaker(broken)
    assert rule(broken), f"{rule.__name__} let {breaker.__name__} through"


def test_the_gpu_overlay_asks_for_gpus_the_way_kuberay_reads_them():
    (group,) = rayjob(render("gpu"))["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] >= 1
