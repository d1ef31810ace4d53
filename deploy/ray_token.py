"""`python -m deploy.ray_token PATH`: make the Ray cluster's auth token, once.

Compose's `ray-token` service runs this before any Ray process starts; every Ray container
then reads the file through RAY_AUTH_TOKEN_PATH with RAY_AUTH_MODE=token, so the job API and
GCS refuse anyone without it. An existing token is kept: restarting the stack must not lock
out a running cluster or a user who already copied it.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys
from pathlib import Path

log = logging.getLogger("deploy.ray_token")


def ensure_token(path: Path) -> bool:
    """Write a fresh random token to `path` unless a non-empty one is there. True if written."""
    if path.is_file() and path.read_text().strip():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    # Owner-only from the first byte, then moved into place: never a readable or half token.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    os.replace(tmp, path)
    return True


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m deploy.ray_token", description=__doc__.split("\n\n")[0])
    p.add_argument("path", type=Path, help="token file (a volume shared by the Ray containers)")
    a = p.parse_args(argv)
    if ensure_token(a.path):
        log.info("new Ray auth token written to %s", a.path)
    else:
        log.info("keeping the Ray auth token in %s", a.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
