"""The compose healthchecks and the Ray token service, against real sockets and files."""

from __future__ import annotations

import http.server
import os
import stat
import subprocess
import sys
import threading

import pytest

from deploy.healthcheck import http_ok, raylet_running
from deploy.ray_token import ensure_token
from deploy.steps import free_port
from tests.helpers import REPO

TOKEN = "s3cret"


@pytest.fixture
def server():
    """A real HTTP server: 200 on /ok, and /jobs answers 200 only with the bearer token."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            authorised = self.headers.get("Authorization") == f"Bearer {TOKEN}"
            status = 200 if self.path == "/ok" or (self.path == "/api/jobs/" and authorised) else 401
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_http_check(server):
    assert http_ok(f"{server}/ok")
    assert not http_ok(f"{server}/api/jobs/")  # 401
    assert http_ok(f"{server}/api/jobs/", TOKEN)
    assert not http_ok(f"http://127.0.0.1:{free_port()}/ok")  # nothing listening


def test_ray_jobs_check_sends_the_token_ray_would_use(server, tmp_path):
    token_file = tmp_path / "auth_token"
    token_file.write_text(TOKEN + "\n")
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
    env.pop("RAY_AUTH_TOKEN", None)
    check = [sys.executable, "-m", "deploy.healthcheck", "ray-jobs", server]
    assert subprocess.run(check, cwd=REPO, env=env).returncode == 0
    r = subprocess.run(check, cwd=REPO, env=dict(env, RAY_AUTH_MODE="disabled"), capture_output=True, text=True)
    assert r.returncode == 1 and "unhealthy" in r.stderr


def test_raylet_check_reads_the_process_table(tmp_path):
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "cmdline").write_bytes(b"/usr/bin/tini\0--\0ray\0")
    assert not raylet_running(tmp_path)
    (tmp_path / "57").mkdir()
    (tmp_path / "57" / "cmdline").write_bytes(
        b"/opt/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet\0--raylet_socket_name=x\0"
    )
    assert raylet_running(tmp_path)


def test_token_is_made_once_owner_only(tmp_path):
    path = tmp_path / "ray" / "auth_token"
    assert ensure_token(path)
    token = path.read_text().strip()
    assert len(token) == 64 and int(token, 16) >= 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not ensure_token(path) and path.read_text().strip() == token  # kept on restart
    path.write_text("")
    assert ensure_token(path) and path.read_text().strip() != token  # an empty file is no token
    assert [p.name for p in path.parent.iterdir()] == ["auth_token"]  # no temp file left
