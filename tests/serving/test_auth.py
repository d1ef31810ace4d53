"""Bearer-token auth on the real server (token from a file), checked before any input is read
or validated; settings that would silently mean "no auth" refuse to start."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
from pydantic import ValidationError

from serving.settings import Settings
from tests.helpers import REPO
from tests.serving.helpers import AUTH, CHUNK, TOKEN, jpeg, serving_env, stream


def endless() -> Iterator[bytes]:
    for _ in range(1024):  # 64 MiB, if anyone kept reading
        yield b"\0" * CHUNK


@pytest.mark.parametrize(
    "method,path,params,headers,without_auth",
    [
        ("post", "/predict", {"k": "five"}, {"content-type": "image/jpeg"}, "422 invalid k"),
        ("post", "/predict", {}, {"content-type": "text/plain"}, "415 content type"),
        ("post", "/predict", {}, {"content-type": "image/jpeg", "authorization": "Bearer wrong"}, "a wrong token"),
        ("post", "/predict", {}, {"content-type": "image/jpeg", "authorization": f"Basic {TOKEN}"}, "another scheme"),
        ("post", "/similar", {}, {"content-type": "image/jpeg"}, "409 no index"),
        ("post", "/index", {"path": "/etc"}, {}, "403 outside the roots"),
        ("get", "/index", {}, {}, "the index state"),
    ],
)
def test_401_before_any_input_is_validated(guarded, method, path, params, headers, without_auth):
    url, _ = guarded
    r = httpx.request(
        method.upper(),
        f"{url}{path}",
        params=params,
        headers=headers,
        content=jpeg() if method == "post" else None,
        timeout=30,
    )
    assert r.status_code == 401, (without_auth, r.text)
    assert r.json()["error"] == "unauthorized" and r.headers["www-authenticate"].startswith("Bearer")


def test_the_body_of_an_unauthenticated_request_is_never_read(guarded):
    status, sent, _ = stream(guarded[0], "image/jpeg", endless())
    assert status == 401 and sent < 32 * 1024 * 1024


def test_with_the_token_from_the_file(guarded):
    url, _ = guarded
    r = httpx.post(f"{url}/predict", content=jpeg(), headers={"content-type": "image/jpeg", **AUTH}, timeout=60)
    assert r.status_code == 200, r.text
    # Probes stay open and say auth is on, without revealing anything else.
    assert httpx.get(f"{url}/health").status_code == 200
    ready = httpx.get(f"{url}/ready").json()
    assert ready["ready"] is True and ready["auth"] is True and TOKEN not in str(ready)
    assert httpx.get(f"{url}/metrics").status_code == 200


@pytest.mark.parametrize(
    "env,message",
    [
        ({"token": ""}, "ALEXNET_TOKEN is set but empty"),
        ({"token": "   "}, "ALEXNET_TOKEN is set but empty"),
        ({"token_file": "EMPTY"}, "is empty"),
        ({"token_file": "MISSING"}, "cannot read ALEXNET_TOKEN_FILE"),
        ({"token": "x", "token_file": "EMPTY"}, "both ALEXNET_TOKEN and ALEXNET_TOKEN_FILE"),
    ],
)
def test_a_configured_but_empty_token_refuses_to_start(checkpoint, tmp_path, env, message):
    (tmp_path / "EMPTY").write_text("\n")
    env = {k: str(tmp_path / v) if k == "token_file" else v for k, v in env.items()}
    r = subprocess.run(
        [sys.executable, "-m", "serving", "--checkpoint", str(checkpoint), "--port", "1"],
        cwd=REPO,
        env=serving_env(**env),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_settings_are_typed_and_validated(monkeypatch):
    monkeypatch.setenv("ALEXNET_MAX_IN_FLIGHT", "12")
    monkeypatch.setenv("ALEXNET_BATCHING", "false")
    s = Settings()
    assert s.max_in_flight == 12 and s.batching is False and s.token is None and not s.auth
    assert Settings(max_in_flight=3).max_in_flight == 3  # flags (init values) win over the environment
    monkeypatch.setenv("ALEXNET_MAX_IN_FLIGHT", "many")
    with pytest.raises(ValidationError, match="max_in_flight"):
        Settings()
    monkeypatch.setenv("ALEXNET_MAX_IN_FLIGHT", "0")
    with pytest.raises(ValidationError, match="max_in_flight"):
        Settings()
    monkeypatch.delenv("ALEXNET_MAX_IN_FLIGHT")
    assert "s3cret" not in repr(Settings(token="s3cret"))  # a SecretStr: never in logs or reprs


def test_a_body_budget_that_cannot_hold_one_upload_refuses_to_start():
    with pytest.raises(ValidationError, match="must hold at least one whole upload"):
        Settings(_env_file=None, max_upload_bytes=1_000_000, max_body_memory_bytes=1_000_000)
    assert Settings(_env_file=None, max_upload_bytes=1_000_000, max_body_memory_bytes=2_000_000)
