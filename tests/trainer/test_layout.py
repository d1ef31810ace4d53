"""The layout a run resolves from its cluster (trainer.layout): the rules on nodes as Ray
reports them, then `python -m trainer.run --print-config` against real Ray clusters started
with logical GPUs (`ray start --num-gpus N`: Ray reports GPUs this machine does not have), and
a run refused before any worker starts when a node cannot see the shard set. No training
worker is started here: a logical GPU cannot train."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import replace

import pytest

from pipeline.shardset import open_shard_set
from tests.helpers import REPO
from tests.raycluster import logical_gpu_cluster
from tests.trainer.helpers import run_main_each
from trainer.config import RuntimeConfig, TrainConfig
from trainer.estimate import CpuRunRefused, cpu_gate
from trainer.layout import LayoutError, Node, check_placement, resolve_layout


def nodes(*gpus: float, cpus: float = 8) -> list[Node]:
    return [Node(f"n{i}", f"10.0.0.{i}", cpus, g) for i, g in enumerate(gpus)]


def layout(nodes_: list[Node], columns: int = 2, batch: int = 128, **runtime) -> tuple:
    r = resolve_layout(RuntimeConfig(**runtime), nodes_, columns=columns, batch_size=batch)
    return r.workers, r.gpus_per_worker, r.amp, r.channels_last


def test_auto_is_a_gpu_pair_per_worker_one_gpu_where_nodes_have_one_and_the_cpu_without():
    assert layout(nodes(4)) == (2, 2, True, True)  # the paper's layout, bf16 + channels_last
    assert layout(nodes(8, 8)) == (8, 2, True, True)
    assert layout(nodes(1, 1)) == (2, 1, True, True)  # both columns on a node's one GPU
    assert layout(nodes(0)) == (1, 0, False, False)  # the CPU: fp32, contiguous, as before GPUs
    assert layout(nodes(0, 0, 0)) == (1, 0, False, False)
    assert layout(nodes(3)) == (1, 2, True, True)  # a worker's two GPUs on one node: one pair fits
    assert layout(nodes(1, 2)) == (1, 2, True, True)  # the pair where there is one
    assert layout(nodes(4), columns=1) == (4, 1, True, True)  # the one-column ablation: a GPU each


def test_auto_workers_divide_the_global_batch_and_fit_each_nodes_cpus():
    assert layout(nodes(4, 4, 4)) == (4, 2, True, True)  # 6 pairs: 128 splits over 4, not 6
    assert layout(nodes(4, 4, 4), batch=96) == (6, 2, True, True)
    assert layout(nodes(8, cpus=2)) == (2, 2, True, True)  # one CPU per worker: two workers fit
    assert layout(nodes(8, cpus=8), cpus_per_worker=3) == (2, 2, True, True)
    with pytest.raises(LayoutError, match="no node can hold a worker of 2 GPU"):
        layout(nodes(2, cpus=1), cpus_per_worker=2)


def test_explicit_values_are_kept_and_checked_against_the_nodes():
    assert layout(nodes(4), workers=1, gpus_per_worker=1, amp=False) == (1, 1, False, True)
    # An explicit worker count gets the most GPUs each that it can be placed with.
    assert layout(nodes(4), workers=2) == (2, 2, True, True)
    assert layout(nodes(4), workers=4) == (4, 1, True, True)
    assert layout(nodes(1), workers=2) == (2, 0, False, False)  # the demo's 2 workers on a 1-GPU laptop: the CPU
    assert layout(nodes(0), gpus_per_worker=0, channels_last=True) == (1, 0, False, True)
    assert layout(nodes(8), gpus_per_worker=1) == (8, 1, True, True)

    def check(nodes_: list[Node], **kw) -> None:
        check_placement(RuntimeConfig(**kw), nodes_)

    check(nodes(4), workers=2, gpus_per_worker=2)
    with pytest.raises(LayoutError, match="4 GPU.s. requested, but the Ray cluster has 0"):
        check(nodes(0), workers=2, gpus_per_worker=2)
    # Two GPUs in all, but one per node: a two-GPU worker would wait forever in Ray.
    with pytest.raises(LayoutError, match="must be on one node .* places at most 0"):
        check(nodes(1, 1), workers=1, gpus_per_worker=2)
    with pytest.raises(LayoutError, match="16 CPU.s. requested for workers, the Ray cluster has 8"):
        check(nodes(0), workers=2, gpus_per_worker=0, cpus_per_worker=8)


def test_a_resubmission_keeps_the_layout_it_was_trained_with():
    stored = RuntimeConfig(workers=1, gpus_per_worker=1, amp=False, channels_last=False)
    r = resolve_layout(RuntimeConfig(), nodes(8), columns=2, batch_size=128, stored=stored)
    assert (r.workers, r.gpus_per_worker, r.amp, r.channels_last) == (1, 1, False, False)
    r = resolve_layout(RuntimeConfig(workers=2), nodes(8), columns=2, batch_size=128, stored=stored)
    assert r.workers == 2  # what is given is kept (and then judged as a change: trainer.resume)


def test_a_full_size_run_on_the_cpu_is_refused_with_its_measured_time_unless_yes(shard_set, caplog):
    """trainer.estimate's gate, on the sample shard set with the bar lowered to its size (the real
    bar, 10,000 train images, is ImageNet's 1%): measured steps of the real model and loop."""
    data, _ = shard_set
    samples = open_shard_set(data).num_samples("train")
    cfg = TrainConfig.preset("sample").updated(
        {"model": {"input_size": 67, "num_classes": 10}, "runtime": {"workers": 1, "gpus_per_worker": 0}}
    )
    with pytest.raises(CpuRunRefused, match=r"s per step of 32 images, so about \d+ (s|min) per epoch") as refused:
        cpu_gate(cfg, samples, yes=False, full_size=samples)
    assert "--yes" in str(refused.value) and "297 train images" in str(refused.value)
    cpu_gate(cfg, samples, yes=True, full_size=samples)  # --yes: said, then started
    assert "starting anyway (--yes)" in caplog.text
    cpu_gate(cfg, samples, yes=False)  # the sample set is not full-size: nothing to say
    gpu = replace(cfg, runtime=replace(cfg.runtime, gpus_per_worker=1))
    cpu_gate(gpu, samples, yes=False, full_size=samples)  # on GPUs: never


def print_configs(cluster, *argvs: list[str]) -> list[dict]:
    """`trainer.run --print-config ARGV` against the cluster, for each ARGV: the runtime section
    it prints (one process for them all: tests/trainer/helpers.py, run_main_each)."""
    returned = run_main_each(
        [["--print-config", "--address", cluster.gcs_address, *argv] for argv in argvs], cluster.env, REPO, 300
    )
    return [printed_runtime(r) for r in returned]


def printed_runtime(r) -> dict:
    """The runtime section a successful `trainer.run --print-config` printed."""
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)["runtime"]


def resolved(runtime: dict) -> tuple:
    return runtime["workers"], runtime["gpus_per_worker"], runtime["amp"], runtime["channels_last"]


@pytest.mark.slow
def test_print_config_resolves_auto_to_two_workers_of_two_gpus_on_a_four_gpu_head(tmp_path):
    with logical_gpu_cluster(tmp_path / "ray", [4]) as cluster:
        auto, off, one = print_configs(cluster, [], ["--no-amp", "--no-channels-last"], ["--gpus-per-worker", "1"])
    assert resolved(auto) == (2, 2, True, True)
    assert resolved(off) == (2, 2, False, False)
    assert resolved(one) == (4, 1, True, True)


@pytest.mark.slow
def test_print_config_resolves_cpu_on_a_cluster_without_gpus(ray_cluster):
    (runtime,) = print_configs(ray_cluster, [])
    assert resolved(runtime) == (1, 0, False, False)


def can_unshare() -> bool:
    """Whether this machine lets us give a process its own mount namespace (root, no seccomp
    filter in the way): a node that cannot see the shard set, on one host."""
    if shutil.which("unshare") is None:
        return False
    r = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", "mount -t tmpfs none /mnt"],
        capture_output=True,
    )
    return r.returncode == 0


@pytest.mark.slow
def test_nodes_of_one_gpu_resolve_one_per_worker_and_a_node_blind_to_the_shards_stops_the_run(shard_set, tmp_path):
    """Two nodes of one logical GPU each: --print-config says 2 workers x 1 GPU. The second node
    runs in its own mount namespace with an empty folder mounted over the shard set (where the
    machine allows it): a real run logs its resolved layout, then stops before any worker
    starts, naming the node that cannot see the shards."""
    data, _ = shard_set
    blind = can_unshare()
    # The second node sees an empty folder where the shard set is: a node without the shared storage.
    wrap = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        f'mount -t tmpfs none "{data}" && exec "$0" "$@"',
    ]
    storage = tmp_path / "runs"
    # fmt: off
    run = ["--data", str(data), "--storage-path", str(storage), "--preset", "sample", "--input-size", "67"]
    # fmt: on
    with logical_gpu_cluster(tmp_path / "ray", [1, 1], wrap_node=wrap if blind else ()) as cluster:
        address = ["--address", cluster.gcs_address]
        argvs = [["--print-config", *address], *([[*address, *run]] if blind else [])]
        printed, *ran = run_main_each(argvs, cluster.env, REPO, 300)  # one process: the config, then the run
    assert resolved(printed_runtime(printed)) == (2, 1, True, True)
    if not blind:
        pytest.skip("no mount namespaces here (unshare): the blind-node half is not run")
    (r,) = ran
    assert r.returncode == 2, r.stderr[-3000:]
    assert "over 2 worker(s) x 1 GPU(s)" in r.stderr  # the resolved layout, logged at start
    assert f"cannot see the shard set {data}" in r.stderr and "ALEXNET_HOME" in r.stderr, r.stderr[-3000:]
    assert not (storage / "alexnet" / "config.json").exists()  # nothing recorded, no worker started
    assert "RayTrainWorker" not in r.stderr
