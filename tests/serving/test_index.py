"""POST /index on the real server: off the request path, one build at a time, every path
(symlinks and a shard set's manifest tar paths) confined to the allowed roots, failures
logged and reported."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from pipeline.shardset import FORMAT, FORMAT_VERSION, MANIFEST
from tests.serving.helpers import AUTH, jpeg

IMAGES = 24


@pytest.fixture(scope="module")
def tree(index_roots, tmp_path_factory):
    """Under the root: a folder of images with one symlink out, a symlinked folder out, a
    shard set whose manifest names a tar out, an empty folder. Outside: the targets."""
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.jpg").write_bytes(jpeg())
    (outside / "x.tar").write_bytes(b"")
    (outside / "x.idx").write_bytes(b"")
    good = index_roots / "good"
    good.mkdir()
    for i in range(IMAGES):
        (good / f"img{i:02d}.jpg").write_bytes(jpeg(colour=(10 * i, 255 - 10 * i, 128)))
    (good / "escape.jpg").symlink_to(outside / "secret.jpg")
    (index_roots / "linkdir").symlink_to(outside, target_is_directory=True)
    shards = index_roots / "shards"
    shards.mkdir()
    # A manifest contract 1's reader accepts (pipeline.shardset), whose files lie outside.
    escape = f"../../{outside.name}/x"
    (shards / MANIFEST).write_text(
        json.dumps(
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "splits": {"val": {"shards": [{"tar": f"{escape}.tar", "idx": f"{escape}.idx"}]}},
            }
        )
    )
    (index_roots / "empty").mkdir()
    return index_roots


def index(url: str, path) -> httpx.Response:
    return httpx.post(f"{url}/index", params={"path": str(path)}, headers=AUTH, timeout=30)


def wait_state(url: str, *states: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        state = httpx.get(f"{url}/index", headers=AUTH, timeout=10).json()
        if state["state"] in states:
            return state
        assert time.monotonic() < deadline, state
        time.sleep(0.2)


def test_paths_outside_the_roots_are_refused(guarded, tree):
    url, _ = guarded
    for path in (
        "/etc",
        tree / "linkdir",
        tree / "shards",
        tree / ".." / tree.name / "..",
        tree / "good" / ".." / "..",
    ):
        r = index(url, path)
        assert r.status_code == 403 and r.json()["error"] == "forbidden_path", (path, r.text)
        assert str(tree) not in r.text  # the reason, without echoing server paths back
    r = index(url, tree / "missing")
    assert r.status_code == 400 and r.json()["error"] == "cannot_index"


def test_index_builds_off_the_request_path_one_at_a_time(guarded, tree):
    url, log = guarded
    t0 = time.monotonic()
    first = index(url, tree / "good")
    assert first.status_code == 202 and first.json()["state"] == "building", first.text
    assert time.monotonic() - t0 < 5  # answered at once; the build goes on in the background
    second = index(url, tree / "good")
    assert second.status_code == 409 and second.json()["error"] == "index_busy"
    assert httpx.get(f"{url}/ready").json()["index"] == {"state": "building"}
    state = wait_state(url, "ready", "failed")
    assert state == {
        "state": "ready",
        "size": IMAGES,
        "source": "good",
        "truncated": False,
    }  # the symlink out was skipped
    assert "escape.jpg resolves outside the allowed roots" in log.read_text()
    assert httpx.get(f"{url}/ready").json()["index"] == {"state": "ready", "size": IMAGES}
    r = httpx.post(
        f"{url}/similar", params={"k": 3}, content=jpeg(), headers={"content-type": "image/jpeg", **AUTH}, timeout=60
    )
    assert r.status_code == 200 and len(r.json()["neighbours"]) == 3
    assert all(not n["source"].startswith("/") for n in r.json()["neighbours"])  # relative to the root


def test_a_failed_build_is_logged_and_reported(guarded, tree):
    url, log = guarded
    wait_state(url, "ready", "failed", "none")
    assert index(url, tree / "empty").status_code == 202
    state = wait_state(url, "failed")
    assert "no images found" in state["error"]
    assert "indexing" in log.read_text() and "failed: no images found" in log.read_text()
