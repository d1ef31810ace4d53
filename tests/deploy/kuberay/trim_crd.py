"""Make tests/deploy/kuberay/rayjob-<tag>.json from KubeRay's own CRDs (a maintainer's step,
run when a KubeRay version is added; the tests read only the JSON it writes).

    python -m tests.deploy.kuberay.trim_crd KUBERAY_CHECKOUT/ray-operator/config/crd/bases TAG COMMIT

Takes the `v1` openAPIV3Schema of ray.io_rayjobs.yaml (whose `rayClusterSpec` must equal the
RayCluster CRD's `spec`, checked here), and
  - replaces each embedded pod template (headGroupSpec/workerGroupSpecs[].template,
    submitterPodTemplate) with a $ref to Kubernetes' own PodTemplateSpec schema, which the
    tests take from the kubernetes-validate package: the CRD repeats that schema (70 kB a
    copy), and the pods are checked against the real one;
  - makes unknown fields an error (additionalProperties: false wherever the CRD lists the
    properties and does not say x-kubernetes-preserve-unknown-fields), as `kubectl apply`'s
    default strict field validation does.
What the CRD cannot say (x-kubernetes-validations rules on fields this project does not set,
the operator's own validation in Go) is not in here: tests/deploy/test_kuberay.py has the
operator's rules the manifests depend on.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

POD_TEMPLATE_REF = "https://kubernetes.io/api/_definitions.json#/$defs/io.k8s.api.core.v1.PodTemplateSpec"
POD_TEMPLATES = ("template", "submitterPodTemplate")


def v1_schema(crd_file: Path) -> dict:
    crd = yaml.safe_load(crd_file.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def trim(node: dict, name: str | None = None) -> dict:
    if name in POD_TEMPLATES and set(node.get("properties", {})) == {"metadata", "spec"}:
        return {"$ref": POD_TEMPLATE_REF}
    node = {k: v for k, v in node.items() if k != "description"}
    if "properties" in node:
        node["properties"] = {k: trim(v, k) for k, v in node["properties"].items()}
        if not node.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in node:
            node["additionalProperties"] = False
    if isinstance(node.get("items"), dict):
        node["items"] = trim(node["items"])
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = trim(node["additionalProperties"])
    return node


def main(argv: list[str] | None = None) -> int:
    bases, tag, commit = argv if argv is not None else sys.argv[1:]
    bases = Path(bases)
    job = v1_schema(bases / "ray.io_rayjobs.yaml")
    cluster = v1_schema(bases / "ray.io_rayclusters.yaml")
    if job["properties"]["spec"]["properties"]["rayClusterSpec"] != cluster["properties"]["spec"]:
        raise SystemExit("RayJob.spec.rayClusterSpec differs from RayCluster.spec: trim both")
    out = {
        "source": f"ray-project/kuberay {tag} ({commit}): ray-operator/config/crd/bases/ray.io_rayjobs.yaml, "
        "v1 openAPIV3Schema of spec; pod templates as $ref, unknown fields refused",
        "kuberay": tag,
        "spec": trim(job["properties"]["spec"]),
    }
    sys.stdout.write(json.dumps(out, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
