"""`python -m deploy.healthcheck CHECK`: the compose services' healthchecks, and the probes of
the Ray pods on Kubernetes (deploy/k8s: KubeRay's own probes call wget, which the image lacks).

    ray-jobs URL   the Ray job API answers at URL (with the cluster's token when auth is on)
    raylet         a raylet runs in this container (a Ray node that has joined its cluster)
    http URL       URL answers 200 (the prediction API's /ready)

Standard library only: a check runs every few seconds and must start fast.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path


def ray_token() -> str | None:
    """The token Ray itself would use, in Ray's order of precedence."""
    if os.environ.get("RAY_AUTH_MODE", "disabled") != "token":
        return None
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def http_ok(url: str, token: str | None = None, timeout: float = 4.0) -> bool:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def raylet_running(proc: Path = Path("/proc")) -> bool:
    for cmdline in proc.glob("[0-9]*/cmdline"):
        try:
            argv0 = cmdline.read_bytes().split(b"\0", 1)[0]
        except OSError:  # the process ended while we looked
            continue
        if os.path.basename(argv0) == b"raylet":
            return True
    return False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m deploy.healthcheck", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="check", required=True)
    sub.add_parser("ray-jobs").add_argument("url", help="Ray dashboard address, e.g. http://127.0.0.1:8265")
    sub.add_parser("raylet")
    sub.add_parser("http").add_argument("url")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.check == "ray-jobs":
        ok = http_ok(a.url.rstrip("/") + "/api/jobs/", ray_token())
    elif a.check == "raylet":
        ok = raylet_running()
    else:
        ok = http_ok(a.url)
    if not ok:
        sys.stderr.write(f"unhealthy: {a.check}\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
