"""`--ray-address` / RAY_ADDRESS: the same shard tasks fanned out over a real Ray cluster."""

from __future__ import annotations

import json
import re
import sys

import pytest

from pipeline.shard import parse_args, resolve_ray_address, run
from tests.helpers import shard_config, tree_bytes


def test_ray_tasks_write_the_same_bytes_as_local_processes(sample_root, shard_set, tmp_path, monkeypatch):
    pytest.importorskip("ray")
    # A private Ray instance for this test; token auth off so no ~/.ray state is needed.
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    out = tmp_path / "ray"
    manifest = run(shard_config(sample_root, out, ray_address="local"))
    local_out, local_manifest = shard_set
    assert manifest == json.loads((local_out / "manifest.json").read_text().replace(str(local_out), str(out)))
    assert tree_bytes(out) == tree_bytes(local_out)


def test_ray_address_from_the_environment_as_ray_job_submit_sets_it(ray_cluster, sample_root, tmp_path):
    """`ray job submit -- python -m pipeline.shard ...`: Ray sets RAY_ADDRESS for the job and
    the sharder writes its shards as tasks on that cluster, the same bytes as local processes."""
    out = tmp_path / "job"
    local = tmp_path / "local"
    run(shard_config(sample_root, local, limit=24, samples_per_shard=8, workers=1))
    r = ray_cluster.ray(
        "job",
        "submit",
        "--address",
        ray_cluster.dashboard_url,
        "--",
        sys.executable,
        "-m",
        "pipeline.shard",
        "--src",
        str(sample_root),
        "--out",
        str(out),
        "--limit",
        "24",
        "--shard-size",
        "8",
        "--quiet",
    )
    port = ray_cluster.gcs_address.rsplit(":", 1)[1]
    assert re.search(rf"RAY_ADDRESS=\S+:{port}: writing the shards as Ray tasks", r.stdout + r.stderr), r.stdout
    assert tree_bytes(out) == tree_bytes(local)


def test_an_explicit_flag_wins_over_ray_address():
    assert resolve_ray_address(None, {"RAY_ADDRESS": "10.0.0.1:6379"}) == "10.0.0.1:6379"
    assert resolve_ray_address("auto", {"RAY_ADDRESS": "10.0.0.1:6379"}) == "auto"
    assert resolve_ray_address("off", {"RAY_ADDRESS": "10.0.0.1:6379"}) is None
    assert resolve_ray_address(None, {}) is None
    assert parse_args(["--src", "s", "--out", "o", "--ray-address", "off"]).ray_address is None
