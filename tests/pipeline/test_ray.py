"""`--ray-address`: the same shard tasks fanned out over a real (local) Ray cluster."""

from __future__ import annotations

import json

import pytest

from pipeline.shard import run
from tests.conftest import shard_config
from tests.pipeline.test_shard import tree_bytes


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
