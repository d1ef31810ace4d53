"""The KubeRay and Kubernetes manifests in deploy/k8s: each command is one the project's own
CLIs accept, the Ray cluster matches what the training command asks of it, and every pod runs
as a non-root user with token auth on."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from tests.pipeline.test_shard import REPO
from trainer.run import parse_args as train_parse_args

K8S = REPO / "deploy" / "k8s"


def documents() -> dict[str, dict]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return docs


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict]:
    return documents()


def pod_specs(k8s):
    job = k8s["RayJob/alexnet-train"]["spec"]["rayClusterSpec"]
    yield "ray-head", job["headGroupSpec"]["template"]["spec"]
    for group in job["workerGroupSpecs"]:
        yield group["groupName"], group["template"]["spec"]
    yield "shard", k8s["Job/alexnet-shard"]["spec"]["template"]["spec"]
    yield "api", k8s["Deployment/alexnet-api"]["spec"]["template"]["spec"]


def test_the_ray_cluster_fits_the_training_command(k8s):
    job = k8s["RayJob/alexnet-train"]["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[:3] == ["python", "-m", "trainer.run"]
    cfg, _ = train_parse_args(argv[3:])
    assert cfg.preset == "paper" and cfg.gpus_per_worker == 2
    (group,) = job["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == cfg.workers
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == cfg.gpus_per_worker  # one Train worker per pod: its two columns
    assert int(limits["cpu"]) >= cfg.cpus_per_worker
    assert job["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert job["rayClusterSpec"]["authOptions"]["mode"] == "token"


def test_every_pod_mounts_what_its_command_reads_and_writes(k8s):
    mounts = {name: {m["mountPath"] for c in spec["containers"] for m in c.get("volumeMounts", [])}
              for name, spec in pod_specs(k8s)}
    cfg, _ = train_parse_args(shlex.split(k8s["RayJob/alexnet-train"]["spec"]["entrypoint"])[3:])
    for name in ("ray-head", "gpu-pairs"):
        assert str(Path(cfg.data).parent) in mounts[name] and cfg.storage_path in mounts[name], name
    api_cmd = k8s["Deployment/alexnet-api"]["spec"]["template"]["spec"]["containers"][0]["command"]
    checkpoint = api_cmd[api_cmd.index("--checkpoint") + 1]
    assert checkpoint == f"{cfg.storage_path}/{cfg.name}" and cfg.storage_path in mounts["api"]
    shard_cmd = k8s["Job/alexnet-shard"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert shard_cmd[shard_cmd.index("--out") + 1] == cfg.data
    claims = {v["persistentVolumeClaim"]["claimName"] for _, spec in pod_specs(k8s) for v in spec["volumes"]
              if "persistentVolumeClaim" in v}
    declared = {name.split("/", 1)[1] for name in k8s if name.startswith("PersistentVolumeClaim/")}
    assert claims - declared == {"alexnet-imagenet-raw"}  # the user's raw ImageNet, theirs to provide


def test_every_pod_runs_as_non_root(k8s):
    for name, spec in pod_specs(k8s):
        ctx = spec["securityContext"]
        assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] != 0, name


def test_the_api_is_probed_and_the_dashboard_is_not_exposed(k8s):
    api = k8s["Deployment/alexnet-api"]["spec"]["template"]["spec"]["containers"][0]
    assert api["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert api["livenessProbe"]["httpGet"]["path"] == "/health"
    services = [doc for doc in k8s.values() if doc["kind"] == "Service"]
    assert all(doc["spec"].get("type", "ClusterIP") == "ClusterIP" for doc in services)
