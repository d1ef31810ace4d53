"""A real Ray cluster for the training and deploy tests (registered in tests/conftest.py): `ray start --head` on free loopback ports,
shared by the whole test session (a 2-worker fit costs ~20 s of start-up and ~2 GB), and
stopped by its own process group, never with `ray stop` (which kills every Ray on the host).
It offers 8 logical CPUs on 2 cores: tests/trainer/test_resume.py runs up to eight tiny
workers side by side, since most of a tiny run's time is Ray starting and stopping it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from deploy.steps import free_port, ray_head_ports

VENV_BIN = Path(sys.executable).parent


def ray_env() -> dict:
    env = dict(os.environ)
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}")
    return env


@dataclass
class RayCluster:
    gcs_address: str
    dashboard_url: str
    env: dict

    def ray(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        """Run the ray CLI. A job submission refused with "No available agent" (the agent
        starts a little after the job API answers) never started a job: retried."""
        for _ in range(20):
            r = subprocess.run([str(VENV_BIN / "ray"), *args], env=self.env, capture_output=True, text=True,
                               timeout=timeout)
            if r.returncode == 0 or "No available agent" not in r.stdout + r.stderr:
                break
            time.sleep(3)
        if check and r.returncode != 0:
            raise subprocess.CalledProcessError(r.returncode, r.args, r.stdout, r.stderr)
        return r


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    pytest.importorskip("ray")
    gcs_port, dash_port = free_port(), free_port()
    env = ray_env()
    log = tmp_path_factory.mktemp("ray") / "ray-start.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
             f"--port={gcs_port}", f"--dashboard-port={dash_port}", "--dashboard-host=127.0.0.1",
             *ray_head_ports(), "--num-cpus=8", "--num-gpus=0",
             "--include-dashboard=true", "--disable-usage-stats"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    cluster = RayCluster(gcs_address=f"127.0.0.1:{gcs_port}", dashboard_url=f"http://127.0.0.1:{dash_port}", env=env)
    try:
        deadline = time.monotonic() + 120
        while True:  # ready when the job API answers
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited: {log.read_text()[-2000:]}")
            r = cluster.ray("job", "list", "--address", cluster.dashboard_url, timeout=60, check=False)
            if r.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"Ray did not come up: {r.stderr[-2000:]}")
            time.sleep(2)
        yield cluster
    finally:
        try:  # a graceful stop takes Ray ~30 s here; nothing of a test cluster needs keeping
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
