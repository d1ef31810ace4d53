"""A real Ray cluster for the training and deploy tests (registered in tests/conftest.py):
`ray start --head` on free loopback ports, started once per test run by the first test that
needs it and shared by every test and every pytest-xdist worker (tests/once.py; a 2-worker fit
costs ~20 s of start-up and ~2 GB), and stopped by its own process group at the end of the
run (`stop_cluster`, from the controller's pytest_sessionfinish), never with `ray stop`
(which kills every Ray on the host). It offers 16 logical CPUs on 2 cores: tests/trainer/
test_resume.py runs up to eight tiny workers side by side while other xdist workers submit
jobs, since most of a tiny run's time is Ray starting and stopping it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from deploy.steps import RAY, free_port, private_ray_head, short_temp_dir
from tests.once import built_once

VENV_BIN = Path(sys.executable).parent
LOGICAL_CPUS = 16
CLUSTER = "cluster.json"


def ray_env() -> dict:
    """The tests' Ray environment: no token auth, no usage stats, the venv's `ray` first, and no
    preemption watcher (an actor process per Train run, ~1.5 CPU-seconds, that polls for node
    drains a one-host test cluster never has; Ray Train's own switch)."""
    env = dict(os.environ)
    env.update(
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0",
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    return env


def head_env() -> dict:
    """The head's own environment: no pool of idle workers started when the first driver
    connects (one per logical CPU, ~1 CPU-second each: Ray Train's actors, which carry a
    runtime env, do not use them)."""
    return {**ray_env(), "RAY_prestart_worker_first_driver": "0"}


@dataclass
class RayCluster:
    gcs_address: str
    dashboard_url: str
    env: dict

    def ray(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        """Run the ray CLI. A job submission refused with "No available agent" (the agent
        starts a little after the job API answers) never started a job: retried."""
        for _ in range(20):
            r = subprocess.run(
                [str(VENV_BIN / "ray"), *args], env=self.env, capture_output=True, text=True, timeout=timeout
            )
            if r.returncode == 0 or "No available agent" not in r.stdout + r.stderr:
                break
            time.sleep(3)
        if check and r.returncode != 0:
            raise subprocess.CalledProcessError(r.returncode, r.args, r.stdout, r.stderr)
        return r


def start_cluster(folder: Path) -> None:
    """`ray start --head` in its own process group; FOLDER/cluster.json once the job API answers."""
    gcs_port, dash_port = free_port(), free_port()
    env = ray_env()
    log = folder / "ray-start.log"
    temp_dir = short_temp_dir("alexnet-tests-ray-")  # its own: see deploy.steps.private_ray_head
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                *private_ray_head(gcs_port, dash_port, temp_dir),
                f"--num-cpus={LOGICAL_CPUS}",
                "--num-gpus=0",
                "--include-dashboard=true",
            ],
            env=head_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    record = {
        "gcs_address": f"127.0.0.1:{gcs_port}",
        "dashboard_url": f"http://127.0.0.1:{dash_port}",
        "pgid": proc.pid,
        "temp_dir": str(temp_dir),
    }
    (folder / CLUSTER).write_text(json.dumps(record))  # written first: stop_cluster finds even a failed start
    cluster = RayCluster(record["gcs_address"], record["dashboard_url"], env)
    deadline = time.monotonic() + 120
    try:
        while True:  # ready when the job API answers
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited: {log.read_text()[-2000:]}")
            r = cluster.ray("job", "list", "--address", cluster.dashboard_url, timeout=60, check=False)
            if r.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"Ray did not come up: {r.stderr[-2000:]}")
            time.sleep(2)
    except BaseException:
        stop_cluster(folder.parent.parent)  # the next test to ask starts afresh
        raise


def stop_cluster(root: Path) -> None:
    """End the run's cluster, if one was started: SIGTERM to its process group, then SIGKILL
    (a graceful stop takes Ray ~30 s here; nothing of a test cluster needs keeping)."""
    record = root / "shared" / "ray" / CLUSTER
    if not record.is_file():
        return
    cluster = json.loads(record.read_text())
    pgid = cluster["pgid"]
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
    shutil.rmtree(cluster["temp_dir"], ignore_errors=True)
    record.unlink()


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory) -> RayCluster:
    pytest.importorskip("ray")
    folder = built_once(tmp_path_factory, "ray", start_cluster)
    record = json.loads((folder / CLUSTER).read_text())
    return RayCluster(record["gcs_address"], record["dashboard_url"], ray_env())


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to the group of a `ray start --block` we started (never `ray stop`)."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


NODES = "ALIVE_NODES="


def alive_nodes(gcs_address: str, env: dict) -> list[dict]:
    """The cluster's alive nodes as Ray's own client reports them (a short-lived driver). Its
    answer is the one line marked NODES: a driver's stdout also carries what Ray streams to
    drivers (another process's error, a raylet's stack)."""
    code = (
        f"import json, ray; ray.init(address={gcs_address!r}, logging_level='ERROR', log_to_driver=False); "
        f"print({NODES!r} + json.dumps([n['Resources'] for n in ray.nodes() if n['Alive']]))"
    )
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    answers = [line[len(NODES) :] for line in r.stdout.splitlines() if line.startswith(NODES)]
    return json.loads(answers[-1]) if r.returncode == 0 and answers else []


class NodeExited(RuntimeError):
    """A node of a logical-GPU cluster exited while the cluster was coming up."""


@contextmanager
def logical_gpu_cluster(
    folder: Path, gpus_per_node: Sequence[int], cpus_per_node: int = 4, wrap_node: Sequence[str] = ()
) -> Iterator[RayCluster]:
    """A private Ray cluster of `len(gpus_per_node)` nodes on this host, each offering that many
    logical GPUs (`ray start --num-gpus N` makes Ray report GPUs it does not have: for resolving
    and checking layouts; never for training). The first node is the head; the others join it
    with their own temp dirs and ports, each command prefixed by `wrap_node` (e.g. `unshare`).
    Stopped by their own process groups on exit. A node that dies while the cluster comes up
    (a port taken between picking and binding it, on a machine running other Rays) gets the
    whole cluster started once more, on new ports; its log is kept beside the new one."""
    for attempt in (1, 2):
        with ExitStack() as stack:
            try:
                cluster = start_logical_gpu_cluster(
                    stack, folder / f"try{attempt}", gpus_per_node, cpus_per_node, wrap_node
                )
            except NodeExited:
                if attempt == 2:
                    raise
                continue
            yield cluster
            return


def start_logical_gpu_cluster(
    stack: ExitStack, folder: Path, gpus_per_node: Sequence[int], cpus_per_node: int, wrap_node: Sequence[str]
) -> RayCluster:
    env = ray_env()
    gcs_port, dash_port = free_port(), free_port()
    gcs = f"127.0.0.1:{gcs_port}"
    folder.mkdir(parents=True, exist_ok=True)
    procs: dict[str, subprocess.Popen] = {}

    def start(name: str, argv: list[str]) -> None:
        log = open(folder / f"{name}.log", "w")
        stack.callback(log.close)
        proc = subprocess.Popen(
            argv,
            env=head_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        stack.callback(stop_process_group, proc)
        procs[name] = proc

    def logs() -> dict[str, str]:
        return {p.name: p.read_text()[-1500:] for p in folder.glob("*.log")}

    temp_dirs = [short_temp_dir(f"alexnet-node{i}-") for i in range(len(gpus_per_node))]
    for temp_dir in temp_dirs:  # each node its own (deploy.steps.private_ray_head says why)
        stack.callback(shutil.rmtree, temp_dir, ignore_errors=True)
    head = private_ray_head(gcs_port, dash_port, temp_dirs[0])
    start("head", [*head, f"--num-cpus={cpus_per_node}", f"--num-gpus={gpus_per_node[0]}"])
    for i, gpus in enumerate(gpus_per_node[1:], 1):
        ports = [
            f"--{name}={free_port()}"
            for name in (
                "node-manager-port",
                "object-manager-port",
                "metrics-export-port",
                "dashboard-agent-listen-port",
                "dashboard-agent-grpc-port",
                "runtime-env-agent-port",
            )
        ]
        # fmt: off
        start(f"node{i}", [*wrap_node, RAY, "start", f"--address={gcs}", "--block", "--node-ip-address=127.0.0.1",
                           f"--num-cpus={cpus_per_node}", f"--num-gpus={gpus}", "--disable-usage-stats",
                           f"--temp-dir={temp_dirs[i]}", *ports])
        # fmt: on
    deadline = time.monotonic() + 180
    while len(alive_nodes(gcs, env)) < len(gpus_per_node):
        exited = [name for name, proc in procs.items() if proc.poll() is not None]
        if exited:
            raise NodeExited(f"{', '.join(exited)} exited while the logical-GPU cluster came up: {logs()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the logical-GPU cluster did not come up: {logs()}")
        time.sleep(2)
    return RayCluster(gcs, f"http://127.0.0.1:{dash_port}", env)
