"""Steps shared by the one-machine demo (deploy.demo) and the compose job (deploy.job):
running a stage's command, waiting for a service, submitting a Ray job, stopping what we
started. Standard library only, so the image needs no test client to run them."""

from __future__ import annotations

import logging
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("deploy")
PY = sys.executable
RAY = str(Path(sys.executable).parent / "ray")


# Ray's workers take ports from 10002-19999 by default; the kernel hands out its ephemeral range
# (/proc/sys/net/ipv4/ip_local_port_range, 32768-60999 by default) to every `bind(0)` and
# outgoing connection. A port picked free and bound a moment later must come from neither.
PICK_FROM = 20000


def ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port free on loopback now, for a server we start next. Picked at random outside the
    kernel's ephemeral range: a port the kernel just gave us from that range it gives to the
    next process that asks, and a Ray node binds its ports seconds after we pick them, while
    other Rays and servers on the machine are binding theirs (a raylet that loses that race
    dies). Falls back to the kernel's pick where that range leaves no room."""
    high = ephemeral_low()
    rng = random.SystemRandom()
    for _ in range(64 if high - PICK_FROM > 1000 else 0):
        port = rng.randrange(PICK_FROM, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stage(title: str) -> None:
    log.info("==== %s", title)


def run(cmd: list[str], **kw) -> None:
    log.info("$ %s", " ".join(cmd))
    subprocess.run(cmd, check=True, **kw)


def wait_until(check, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with status {proc.returncode}")
        if check():
            return
        time.sleep(1)
    raise RuntimeError(f"timed out waiting for {what}")


def ray_head_ports() -> list[str]:
    """Every port the head listens on, picked free: a second Ray on this machine (the user's
    own, or a test's) must not collide with ours on a default port."""
    names = (
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "metrics-export-port",
        "runtime-env-agent-port",
        "node-manager-port",
        "object-manager-port",
        "ray-client-server-port",
    )
    return [f"--{name}={free_port()}" for name in names]


def private_ray_head(gcs_port: int, dashboard_port: int, temp_dir: Path) -> list[str]:
    """`ray start --head --block` for a Ray of our own on loopback: every port picked free, and
    its own --temp-dir. The temp dir matters as much as the ports: Ray's job supervisor starts
    a job's driver with RAY_ADDRESS resolved from "the newest cluster" recorded in its temp
    dir, so with two Rays sharing the default /tmp/ray, a job submitted to ours could run
    against the other one. TEMP_DIR must be short (Ray's Unix socket paths live under it)."""
    return [
        RAY,
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs_port}",
        f"--dashboard-port={dashboard_port}",
        "--dashboard-host=127.0.0.1",
        *ray_head_ports(),
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]


def short_temp_dir(prefix: str) -> Path:
    """A new folder under /tmp (where there is one: a Unix socket path must stay under ~100 bytes)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp" if os.path.isdir("/tmp") else None))


def ray_job_api_up(address: str, env: dict) -> bool:
    """The Ray job API at `address` answers (`ray job list`, with the token auth in `env`)."""
    return subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True).returncode == 0


def submit_job(address: str, entrypoint: list[str], env: dict, attempts: int = 20) -> None:
    """`ray job submit` (blocking, output streamed). The job agent can come up a little
    after the job API answers ("No available agent"): that submission never started a
    job, so it is retried; any other failure is the job's own and is raised."""
    cmd = [RAY, "job", "submit", "--address", address, "--", *entrypoint]
    log.info("$ %s", " ".join(cmd))
    for attempt in range(attempts):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        assert proc.stdout is not None  # stdout=PIPE
        for line in proc.stdout:
            sys.stderr.write(line)
            lines.append(line)
        if proc.wait() == 0:
            return
        if not any("No available agent" in line for line in lines[-20:]):
            raise subprocess.CalledProcessError(proc.returncode, cmd)
        log.info("job agent not ready yet; submitting again (%d/%d)", attempt + 2, attempts)
        time.sleep(3)
    raise RuntimeError("the Ray job agent never became ready")


def stop_group(proc: subprocess.Popen) -> None:
    """Stop a process we started in its own group (never `ray stop`: it kills every Ray here)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
