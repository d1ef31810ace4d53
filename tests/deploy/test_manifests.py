"""The rendered deploy/k8s overlays hold together: every command is one the project's own CLIs
accept, the Ray cluster matches what the training command asks of it, the images are builds
of deploy/Dockerfile (the CUDA one where there are GPUs) with the Ray that rayVersion names,
each stage waits for the one before it, and the API mounts what it serves from."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import deploy.healthcheck
import deploy.wait
import pipeline.sample
import pipeline.shard
import trainer.run
from tests.deploy.dockerfile import arg_default, build_targets
from tests.deploy.k8s import OVERLAYS, by_key, containers, gpus, pod_specs, rayjob, render
from tests.helpers import REPO

PLACEHOLDERS = ("alexnet-2012", "alexnet-2012-ray")  # the image names in deploy/k8s/base


def entrypoint(docs) -> list[str]:
    return shlex.split(rayjob(docs)["spec"]["entrypoint"])


def train_config(docs):
    argv = entrypoint(docs)
    assert argv[:3] == ["python", "-m", "trainer.run"]
    cfg, _ = trainer.run.parse_args(argv[3:])
    return cfg


def serving_parses(args: list[str], tmp_path: Path) -> None:
    """`python -m serving ARGS` parses (it gets as far as checking the checkpoint, which is
    replaced by an empty folder: exit status 2 with 'cannot serve', not argparse's usage)."""
    args = list(args)
    args[args.index("--checkpoint") + 1] = str(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "serving", *args], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert proc.returncode == 2 and "cannot serve" in proc.stderr and "usage:" not in proc.stderr, proc.stderr[-2000:]


def parse_command(argv: list[str], tmp_path: Path) -> None:
    """Parse a container's command or probe with the CLI it runs; anything else is an error."""
    assert argv[:2] == ["python", "-m"], argv
    module, args = argv[2], argv[3:]
    if module == "trainer.run":
        trainer.run.parse_args(args)
    elif module == "pipeline.shard":
        pipeline.shard.parse_args(args)
    elif module == "pipeline.sample":  # no parser of its own: run it, into a scratch folder
        args[args.index("--out") + 1] = str(tmp_path / "sample")
        assert pipeline.sample.main(args) == 0
    elif module == "deploy.wait":
        deploy.wait.parse_args(args)
    elif module == "deploy.healthcheck":
        deploy.healthcheck.parse_args(args)
    elif module == "serving":
        serving_parses(args, tmp_path)
    else:
        raise AssertionError(f"no CLI known for {module}")


def commands(docs) -> list[tuple[str, list[str]]]:
    found = [("RayJob entrypoint", entrypoint(docs))]
    for pod, spec in pod_specs(docs):
        for c in containers(spec):
            if "command" in c:
                found.append((f"{pod}/{c['name']}", c["command"] + c.get("args", [])))
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if "exec" in c.get(probe, {}):
                    found.append((f"{pod}/{c['name']} {probe}", c[probe]["exec"]["command"]))
    return found


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_command_parses_with_the_projects_own_cli(overlay, tmp_path):
    found = commands(render(overlay))
    assert {argv[2] for _, argv in found} >= {
        "trainer.run",
        "pipeline.shard",
        "serving",
        "deploy.wait",
        "deploy.healthcheck",
    }
    for where, argv in found:
        try:
            parse_command(argv, tmp_path)
        except SystemExit as exc:  # argparse refused it
            raise AssertionError(f"{where}: {shlex.join(argv)} does not parse") from exc


def test_a_command_the_cli_refuses_is_caught(tmp_path):
    with pytest.raises(SystemExit):
        parse_command(["python", "-m", "trainer.run", "--data", "/data/shards", "--gpus-per-worker", "two"], tmp_path)
    with pytest.raises(SystemExit):
        parse_command(["python", "-m", "deploy.wait", "shard", "/data/shards"], tmp_path)
    with pytest.raises(AssertionError):
        parse_command(["python", "-m", "serving", "--checkpoint", "/runs/x", "--reload-every", "60"], tmp_path)


def test_every_module_the_pods_run_is_in_the_image():
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    for overlay in OVERLAYS:
        for _, argv in commands(render(overlay)):
            module = argv[2]
            if module.startswith("deploy."):
                assert f"deploy/{module.split('.')[1]}.py" in dockerfile, module
            else:
                assert f"COPY {module.split('.')[0]} " in dockerfile, module


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_builds_of_the_dockerfile_the_cuda_one_on_gpus(overlay):
    targets = build_targets()
    docs = render(overlay)
    ray_images = set()
    for pod, spec in pod_specs(docs):
        for c in containers(spec):
            name, _, tag = c["image"].rpartition(":")
            assert name and "/" not in tag, f"{pod}/{c['name']}: {c['image']} has no tag"
            assert name not in PLACEHOLDERS[1:], f"{pod}: the placeholder {name} was not mapped"
            assert tag != "latest" and tag.rsplit("-", 1)[-1] in targets, f"{pod}: {c['image']} names no build target"
            if gpus(c):
                assert tag.rsplit("-", 1)[-1] == "gpu", f"{pod}/{c['name']} has GPUs but runs {c['image']}"
            if pod.startswith("RayJob/"):
                ray_images.add(c["image"])
    # Head, workers and submitter: one image, one Ray (KubeRay's advice against version skew).
    assert len(ray_images) == 1, ray_images


def test_an_image_that_is_not_a_build_target_is_caught():
    docs = render("gpu")
    worker = rayjob(docs)["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    worker["image"] = worker["image"].replace("-gpu", "-cpu")
    with pytest.raises(AssertionError):
        for pod, spec in pod_specs(docs):
            for c in containers(spec):
                if gpus(c):
                    assert c["image"].endswith("gpu"), pod


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_version_is_the_images(overlay):
    cluster = rayjob(render(overlay))["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == arg_default("RAY_VERSION")
    assert cluster["authOptions"]["mode"] == "token"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_ray_cluster_fits_the_training_command(overlay):
    docs = render(overlay)
    cfg = train_config(docs)
    cluster = rayjob(docs)["spec"]["rayClusterSpec"]
    (group,) = cluster["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == cfg.runtime.workers
    ray = group["template"]["spec"]["containers"][0]
    # One Train worker per pod: its two columns on the pod's GPUs (none on CPU).
    assert gpus(ray) == cfg.runtime.gpus_per_worker
    assert float(ray["resources"]["limits"]["cpu"]) >= cfg.runtime.cpus_per_worker
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_the_gpu_overlay_schedules_on_gpu_nodes_and_cpu_demo_needs_none():
    cfg = train_config(render("gpu"))
    assert cfg.recipe.name == "paper" and cfg.runtime.gpus_per_worker == 2
    (group,) = rayjob(render("gpu"))["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    spec = group["template"]["spec"]
    assert spec["nodeSelector"]
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in spec["tolerations"])
    docs = render("cpu-demo")
    assert train_config(docs).runtime.gpus_per_worker == 0
    assert not [c for _, s in pod_specs(docs) for c in containers(s) if gpus(c)]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_mounts_what_its_command_reads_and_writes(overlay):
    docs = render(overlay)
    keyed = by_key(docs)
    cfg = train_config(docs)
    data_root = str(Path(cfg.input.data).parent)
    mounts = {
        pod: {m["mountPath"]: m.get("readOnly", False) for c in containers(s) for m in c.get("volumeMounts", [])}
        for pod, s in pod_specs(docs)
    }
    for pod in mounts:
        if pod.startswith("RayJob/") and not pod.endswith("submitter"):
            assert mounts[pod][data_root] is True and mounts[pod][cfg.runtime.storage_path] is False, pod
            assert "/dev/shm" in mounts[pod], f"{pod}: Ray's object store needs /dev/shm"
    shard = keyed["Job/alexnet-shard"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert shard[shard.index("--out") + 1] == cfg.input.data and mounts["Job/alexnet-shard"][data_root] is False
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for _, s in pod_specs(docs)
        for v in s.get("volumes", [])
        if "persistentVolumeClaim" in v
    }
    declared = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    assert claims - declared <= {"alexnet-imagenet-raw"}  # the user's raw ImageNet, theirs to provide
    for d in docs:
        if d["kind"] == "PersistentVolumeClaim":
            assert d["spec"].get("storageClassName"), f"{overlay}: {d['metadata']['name']} names no storage class"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_training_waits_for_a_complete_shard_set(overlay):
    docs = render(overlay)
    cfg = train_config(docs)
    head = rayjob(docs)["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    waits = [c["command"] for c in head.get("initContainers", []) if c["command"][2] == "deploy.wait"]
    assert waits and deploy.wait.parse_args(waits[0][3:]) == deploy.wait.WaitConfig("shards", Path(cfg.input.data))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_api_waits_for_a_checkpoint_then_follows_the_run(overlay):
    docs = render(overlay)
    cfg = train_config(docs)
    spec = by_key(docs)["Deployment/alexnet-api"]["spec"]["template"]["spec"]
    run_dir = Path(cfg.runtime.storage_path) / cfg.runtime.name
    (wait,) = spec["initContainers"]
    assert deploy.wait.parse_args(wait["command"][3:]) == deploy.wait.WaitConfig("checkpoint", run_dir)
    api = spec["containers"][0]
    cmd = api["command"]
    assert Path(cmd[cmd.index("--checkpoint") + 1]) == run_dir and float(cmd[cmd.index("--watch-s") + 1]) > 0
    # Time to load the model before liveness counts, instead of a restart loop.
    startup = api["startupProbe"]
    assert startup["httpGet"]["path"] == "/health"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120
    assert api["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert api["livenessProbe"]["httpGet"]["path"] == "/health"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_api_takes_its_token_from_a_secret_and_serves_similar_from_the_shards(overlay):
    docs = render(overlay)
    cfg = train_config(docs)
    spec = by_key(docs)["Deployment/alexnet-api"]["spec"]["template"]["spec"]
    api = spec["containers"][0]
    env = {e["name"]: e for e in api["env"]}
    assert "ALEXNET_TOKEN" not in env  # a file, not a variable anyone who can read the pod sees
    token_file = Path(env["ALEXNET_TOKEN_FILE"]["value"])
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in api["volumeMounts"]}
    token_mount = mounts[str(token_file.parent)]
    secret = volumes[token_mount["name"]]["secret"]
    assert secret["secretName"] == "alexnet-api-token" and token_mount["readOnly"] is True
    assert [i["path"] for i in secret["items"]] == [token_file.name]
    # /similar: the validation shards, read-only.
    assert env["ALEXNET_INDEX"]["value"] == cfg.input.data
    data = mounts[str(Path(cfg.input.data).parent)]
    assert data["readOnly"] is True and volumes[data["name"]]["persistentVolumeClaim"]["readOnly"] is True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_nothing_is_exposed_outside_the_cluster(overlay):
    services = [d for d in render(overlay) if d["kind"] == "Service"]
    assert services and all(d["spec"].get("type", "ClusterIP") == "ClusterIP" for d in services)
    for _, spec in pod_specs(render(overlay)):
        assert spec.get("automountServiceAccountToken") is False
