"""Every rendered resource of every overlay against the schemas a cluster checks it with:
the core resources against the Kubernetes 1.37 API (kubernetes-validate, strict: unknown
fields refused, as `kubectl apply` does by default), the RayJob against KubeRay's CRD schema
of the oldest supported (v1.5.1) and the newest (v1.7.0) operator, its pod templates against
Kubernetes' own PodTemplateSpec. Each check is shown to fail on a manifest that breaks it."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
from kubernetes_validate.utils import schema_contents
from referencing import Registry, Resource

from tests.deploy.k8s import OVERLAYS, rayjob, render

K8S_VERSION = "1.37.0"
KUBERAY = Path(__file__).parent / "kuberay"
KUBERAY_VERSIONS = sorted(p.stem.removeprefix("rayjob-") for p in KUBERAY.glob("rayjob-v*.json"))
DEFINITIONS = "https://kubernetes.io/api/_definitions.json#/$defs/"


def core_errors(doc: dict) -> list[str]:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(map(str, exc.path))}: {exc.message}"]
    return []


def rayjob_validator(kuberay: str) -> jsonschema.Draft202012Validator:
    crd = json.loads((KUBERAY / f"rayjob-{kuberay}.json").read_text())
    definitions = schema_contents(f"kubernetes-json-schema/v{K8S_VERSION}-local-strict/_definitions.json", K8S_VERSION)
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "ray.io/v1"},
            "kind": {"const": "RayJob"},
            "metadata": {"$ref": DEFINITIONS + "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"},
            "spec": crd["spec"],
        },
        "additionalProperties": False,
    }
    registry = Resource.from_contents(definitions) @ Registry()
    return jsonschema.Draft202012Validator(schema, registry=registry)


def rayjob_errors(doc: dict, kuberay: str) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in rayjob_validator(kuberay).iter_errors(doc)]


def test_the_vendored_crds_are_the_supported_range():
    assert KUBERAY_VERSIONS == ["v1.5.1", "v1.7.0"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_core_resource_is_valid_kubernetes(overlay):
    docs = [d for d in render(overlay) if d["kind"] != "RayJob"]
    assert {d["kind"] for d in docs} >= {"Namespace", "PersistentVolumeClaim", "Job", "Deployment", "Service"}
    for doc in docs:
        assert core_errors(doc) == [], f"{doc['kind']}/{doc['metadata']['name']}"


@pytest.mark.parametrize("kuberay", KUBERAY_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_rayjob_fits_kuberays_crd(overlay, kuberay):
    assert rayjob_errors(rayjob(render(overlay)), kuberay) == []


def test_a_core_resource_with_an_unknown_field_is_refused():
    (deployment,) = [d for d in render(OVERLAYS[0]) if d["kind"] == "Deployment"]
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    assert core_errors(deployment)
    (claim,) = [d for d in render(OVERLAYS[0]) if d["metadata"]["name"] == "alexnet-runs"]
    claim["spec"]["accessModes"] = "ReadWriteMany"  # a string, not a list
    assert core_errors(claim)


@pytest.mark.parametrize("kuberay", KUBERAY_VERSIONS)
def test_a_rayjob_that_breaks_the_crd_is_refused(kuberay):
    job = rayjob(render(OVERLAYS[0]))
    job["spec"]["rayClusterSpec"]["rayversion"] = "2.60.0"  # a misspelt field
    assert any("rayversion" in e for e in rayjob_errors(job, kuberay))
    job = rayjob(render(OVERLAYS[0]))
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "4"  # a string
    assert any("replicas" in e for e in rayjob_errors(job, kuberay))
    # The pod templates are checked as Kubernetes' own PodTemplateSpec.
    job = rayjob(render(OVERLAYS[0]))
    job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["securityContext"]["runAsNonroot"] = True
    assert any("runAsNonroot" in e for e in rayjob_errors(job, kuberay))
