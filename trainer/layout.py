"""Where a run's workers go: the layout (workers x GPUs per worker) resolved from the Ray
cluster the run is given, checked against it, and, on a multi-node cluster, the check that
every node that may run a worker sees the shard set and the storage.

`--gpus-per-worker auto` (the default): 2 where the cluster's nodes have two or more GPUs (the
paper's layout: a column per GPU), 1 where they have one (both columns on it), 0 where the
cluster has no GPU (the CPU). `--workers auto` (the default): as many workers as the nodes hold
at that layout, a worker's GPUs always on one node (Ray places a worker's resources on one
node), CPUs per worker counted too; the most of those that divide the global batch (the
paper's 128: 8 pairs of GPUs use 8 workers, 6 pairs use 4); 1 on the CPU. Beside an explicit
`--workers N`, GPUs per worker "auto" is the most that N workers can be placed with (0, the
CPU, where N workers do not fit on the GPUs). `--amp auto` and
`--channels-last auto` (the defaults): on where the workers have GPUs, off on the CPU (so the
CPU's numerics are those of the code before GPUs were the default). On a resubmitted run,
"auto" keeps the layout the run was trained with.

Explicit numbers are kept and checked: a request the cluster cannot place would wait forever
in Ray (GPUs it does not have, two GPUs on nodes of one), so it is refused before anything
starts (`check_placement`). The nodes come from Ray (`cluster_nodes`: alive nodes and their
CPU and GPU resources), or, for `--print-config` with no cluster to ask, from this machine as a
fresh local Ray would see it (`local_nodes`).

`check_nodes_see` runs a small task on every node that could host a worker (on a cluster of
more than this one): a worker
whose node cannot see the shard set (or a different one at that path), or the storage path,
would fail at its first read or write, after Ray had started the whole worker group; it stops
the run first, saying which node and why.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from trainer.config import AUTO, RuntimeConfig

log = logging.getLogger("trainer.layout")
PROBE_TIMEOUT_S = 120
UNBOUNDED = 1 << 30  # workers that ask for nothing


class LayoutError(RuntimeError):
    """The layout asked for does not fit the cluster (or the cluster cannot run it)."""


@dataclass(frozen=True)
class Node:
    """One alive Ray node and what it offers workers."""

    node_id: str
    address: str
    cpus: float
    gpus: float


def cluster_nodes() -> list[Node]:
    """The connected Ray cluster's alive nodes (ray.nodes(): each node's total resources)."""
    import ray

    return [
        Node(n["NodeID"], n.get("NodeManagerAddress", "?"), n["Resources"].get("CPU", 0), n["Resources"].get("GPU", 0))
        for n in ray.nodes()
        if n.get("Alive")
    ]


def local_nodes() -> list[Node]:
    """This machine, as `ray.init()` here would see it: its cores and visible CUDA devices."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [Node("local", "127.0.0.1", float(os.cpu_count() or 1), float(gpus))]


def workers_fitting(nodes: Sequence[Node], gpus_per_worker: int, cpus_per_worker: int) -> int:
    """How many workers of this shape Ray can place at once: per node, the GPUs (whole, on that
    node) and the CPUs each worker asks for."""
    if gpus_per_worker <= 0 and cpus_per_worker <= 0:
        return UNBOUNDED
    total = 0
    for n in nodes:
        by_cpu = math.floor(n.cpus / cpus_per_worker) if cpus_per_worker > 0 else UNBOUNDED
        by_gpu = math.floor(n.gpus / gpus_per_worker) if gpus_per_worker > 0 else UNBOUNDED
        total += min(by_cpu, by_gpu)
    return total


def describe(nodes: Sequence[Node]) -> str:
    """`2 node(s): 4 GPU + 8 CPU, 4 GPU + 8 CPU`, for the logs and the errors."""
    return f"{len(nodes)} node(s): " + ", ".join(f"{n.gpus:g} GPU + {n.cpus:g} CPU" for n in nodes)


def auto_gpus_per_worker(nodes: Sequence[Node], columns: int) -> int:
    """2 where a node has two or more GPUs (one column each), 1 where the most is one (or the
    model has one column), 0 without GPUs."""
    most = max((math.floor(n.gpus) for n in nodes), default=0)
    return min(most, columns, 2)


def auto_workers(nodes: Sequence[Node], gpus_per_worker: int, cpus_per_worker: int, batch_size: int) -> int:
    """The most workers the nodes place at this shape that divide the global batch; 1 on the CPU."""
    if gpus_per_worker == 0:
        return 1
    fit = workers_fitting(nodes, gpus_per_worker, cpus_per_worker)
    if fit < 1:
        raise LayoutError(
            f"no node can hold a worker of {gpus_per_worker} GPU(s) and {cpus_per_worker} CPU(s) ({describe(nodes)})"
        )
    return max(w for w in range(1, fit + 1) if batch_size % w == 0)


def resolve_layout(
    runtime: RuntimeConfig,
    nodes: Sequence[Node],
    *,
    columns: int,
    batch_size: int,
    stored: RuntimeConfig | None = None,
) -> RuntimeConfig:
    """`runtime` with every "auto" made a number or a switch: from `stored` (the run's own
    settings, on a resubmission), else from the nodes. Explicit values are kept as given; GPUs
    per worker "auto" beside an explicit worker count is the most that many workers can have
    (`--workers 2` on a machine of one GPU: the CPU, as before GPUs were the default)."""
    gpus = runtime.gpus_per_worker
    if gpus == AUTO:
        if stored is not None:
            gpus = stored.gpus_per_worker
        else:
            gpus = auto_gpus_per_worker(nodes, columns)
            if isinstance(runtime.workers, int):
                fits = [
                    g
                    for g in range(gpus, 0, -1)
                    if workers_fitting(nodes, g, runtime.cpus_per_worker) >= runtime.workers
                ]
                gpus = fits[0] if fits else 0
    assert isinstance(gpus, int)
    workers = runtime.workers
    if workers == AUTO:
        workers = (
            stored.workers if stored is not None else auto_workers(nodes, gpus, runtime.cpus_per_worker, batch_size)
        )
    amp, channels_last = runtime.amp, runtime.channels_last
    if amp == AUTO:
        amp = stored.amp if stored is not None else gpus > 0
    if channels_last == AUTO:
        channels_last = stored.channels_last if stored is not None else gpus > 0
    return replace(runtime, workers=workers, gpus_per_worker=gpus, amp=amp, channels_last=channels_last)


def check_placement(runtime: RuntimeConfig, nodes: Sequence[Node]) -> None:
    """A request Ray cannot place waits forever: refuse it now, saying what the cluster has."""
    (workers, gpus), cpus = runtime.layout, runtime.cpus_per_worker
    have_gpus = sum(n.gpus for n in nodes)
    if gpus and have_gpus < workers * gpus:
        raise LayoutError(
            f"{workers} worker(s) x {gpus} GPU(s) = {workers * gpus} GPU(s) requested, but the Ray cluster "
            f"has {have_gpus:g}"
        )
    have_cpus = sum(n.cpus for n in nodes)
    if have_cpus < workers * cpus:
        raise LayoutError(f"{workers * cpus} CPU(s) requested for workers, the Ray cluster has {have_cpus:g}")
    fit = workers_fitting(nodes, gpus, cpus)
    if fit < workers:
        raise LayoutError(
            f"{workers} worker(s) of {gpus} GPU(s) and {cpus} CPU(s) requested, but a worker's resources must "
            f"be on one node and the cluster ({describe(nodes)}) places at most {fit}"
        )


def pinned_cluster(address: str) -> dict | None:
    """RAY_ADDRESS for this job's actors. Ray Train's controller starts a helper actor that
    asks Ray's state API, with no address, whether the controller is alive; on a host with
    several Ray clusters that client picks "the latest" one, maybe another's, and each call
    can hang for its 10 s timeout (measured: every run's end took ~15 s longer, with a
    traceback). Naming our cluster avoids it. Only for a plain GCS address (host:port), and
    not where the job's own runtime env sets RAY_ADDRESS."""
    if not re.fullmatch(r"[\w.\-]+:\d+", address):
        return None
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    if "RAY_ADDRESS" in ((job.get("runtime_env") or {}).get("env_vars") or {}):
        return None
    return {"env_vars": {"RAY_ADDRESS": address}}


def connect(address: str | None) -> bool:
    """Join the Ray cluster: `address`, else the job's (ray job submit sets RAY_ADDRESS), else a
    fresh local Ray, never a guess from a stale /tmp/ray/ray_current_cluster. True if this
    call connected (the caller shuts it down), False if Ray was initialised already."""
    import ray

    if ray.is_initialized():
        return False
    target = address or os.environ.get("RAY_ADDRESS") or "local"
    ray.init(address=target, log_to_driver=True, runtime_env=pinned_cluster(target))
    return True


def _probe(data: str, storage_token: str | None) -> dict:
    """On one node: what it sees of the shard set (its manifest's digest) and the storage."""
    import socket

    seen: dict = {"host": socket.gethostname()}
    try:
        with open(os.path.join(data, "manifest.json"), "rb") as f:
            seen["manifest"] = hashlib.sha256(f.read()).hexdigest()
    except OSError as exc:
        seen["manifest_error"] = f"{type(exc).__name__}: {exc.strerror or exc}"
    if storage_token is not None:
        seen["storage"] = os.path.isfile(storage_token)
    return seen


def check_nodes_see(data: str, storage_path: str, runtime: RuntimeConfig, nodes: Sequence[Node]) -> None:
    """From every node that could host a worker, where that is more than this one: the shard set
    is there, the same one (manifest.json's digest), and so is the storage path (a file written
    here is read there; URIs are Ray's own storage and are not probed). LayoutError naming the
    node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    gpus, cpus = runtime.layout[1], runtime.cpus_per_worker
    others = [n for n in nodes if n.gpus >= gpus and n.cpus >= cpus]  # the nodes a worker may land on
    if [n.node_id for n in others] in ([], [here]):
        return  # every worker runs on this node: check_setup has read the shard set here
    # Every such node, this one too: its raylet's view of the filesystem is what its workers
    # get, which need not be this process's (a node in its own container or mount namespace).
    expected = hashlib.sha256((Path(data) / "manifest.json").read_bytes()).hexdigest()
    token: Path | None = None
    if "://" not in storage_path:
        token = Path(storage_path) / f".node-check-{uuid.uuid4().hex}"
        try:
            token.parent.mkdir(parents=True, exist_ok=True)
            token.write_text("written by trainer.run's driver: every node must see it\n")
        except OSError as exc:
            raise LayoutError(f"cannot write to the storage path {storage_path}: {exc}") from None
    probe = ray.remote(num_cpus=0)(_probe)
    try:
        refs = [
            probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n.node_id, soft=False)).remote(
                data, str(token) if token else None
            )
            for n in others
        ]
        try:
            seen = ray.get(refs, timeout=PROBE_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise LayoutError(
                f"the nodes that would run workers did not answer within {PROBE_TIMEOUT_S} s ({describe(others)})"
            ) from None
    finally:
        if token is not None:
            token.unlink(missing_ok=True)
    shared = (
        "the home (ALEXNET_HOME), or --data and --storage-path, must be on storage every node mounts at the same path"
    )
    for node, what in zip(others, seen):
        where = f"node {node.address} ({what['host']})"
        if "manifest_error" in what:
            raise LayoutError(f"{where} cannot see the shard set {data} ({what['manifest_error']}): {shared}")
        if what["manifest"] != expected:
            raise LayoutError(f"{where} sees another shard set at {data} (its manifest.json differs): {shared}")
        if what.get("storage") is False:
            raise LayoutError(f"{where} cannot see the storage path {storage_path}: {shared}")
    log.info("the shard set and the storage path are visible from every node (%s)", describe(others))
