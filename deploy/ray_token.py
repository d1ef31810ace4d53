"""`python -m deploy.ray_token PATH`: make the Ray cluster's auth token, once.

Compose's `ray-token` service runs this before any Ray process starts; every Ray container
then reads the file through RAY_AUTH_TOKEN_PATH with RAY_AUTH_MODE=token, so the job API and
GCS refuse anyone without it. An existing token is kept: restarting the stack must not lock
out a running cluster or a user who already copied it.
"""

from __future__ import annotations

import argparse
import logging
import secrets
import sys
from pathlib import Path

from pipeline.atomic import write_atomic
from pipeline.cli import setup_logging

log = logging.getLogger("deploy.ray_token")


def ensure_token(path: Path) -> bool:
    """Write a fresh random token to `path` unless a non-empty one is there. True if written."""
    if path.is_file() and path.read_text().strip():
        return False
    # Owner-only from the first byte, then moved into place: never a readable or half token.
    write_atomic(path, secrets.token_hex(32) + "\n", mode=0o600)
    return True


def main(argv: list[str] | None = None) -> int:
    setup_logging()
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
