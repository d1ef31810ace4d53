"""`python -m deploy.wait shards DIR | checkpoint RUN_DIR`: block until a stage's output is complete.

    shards DIR         DIR holds a complete shard set: the check trainer.run itself makes
                       (pipeline.shardset.open_shard_set: manifest.json, written last, and every
                       shard it lists)
    checkpoint RUN     the run folder RUN has a registered checkpoint: the one `python -m
                       serving --checkpoint RUN` would load (trainer.checkpoint.latest_checkpoint)

Kubernetes init containers run it (deploy/k8s): the Ray head waits for the shard set, so the
RayJob submits training only once sharding has finished, and the API waits for a first
checkpoint instead of exiting and being restarted until one exists. Exits 0 once ready, 1
when --timeout-s (0: never) runs out; says what it is waiting for every --log-every-s.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.cli import setup_logging

log = logging.getLogger("deploy.wait")


@dataclass(frozen=True)
class WaitConfig:
    what: str  # shards | checkpoint
    path: Path
    timeout_s: float = 0.0  # 0: wait forever
    interval_s: float = 10.0  # how often to look
    log_every_s: float = 60.0  # how often to say that it is still waiting


def shards_ready(path: Path) -> str | None:
    """None when `path` is a complete shard set, else why not."""
    from pipeline.shardset import ShardSetError, open_shard_set

    try:
        open_shard_set(path)
    except (ShardSetError, OSError, ValueError, KeyError) as exc:
        return str(exc) or type(exc).__name__
    return None


def checkpoint_ready(path: Path) -> str | None:
    """None when the run folder `path` has a registered checkpoint, else why not."""
    from trainer.checkpoint import latest_checkpoint

    if latest_checkpoint(path) is None:
        return f"no registered checkpoint in {path} yet"
    return None


CHECKS = {"shards": shards_ready, "checkpoint": checkpoint_ready}


def parse_args(argv: list[str] | None = None) -> WaitConfig:
    p = argparse.ArgumentParser(
        prog="python -m deploy.wait",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("what", choices=sorted(CHECKS), help="what to wait for")
    p.add_argument("path", type=Path, help="the shard set folder, or the run folder")
    d = WaitConfig("shards", Path("."))
    p.add_argument("--timeout-s", type=float, default=d.timeout_s, help="give up after this long (0: never)")
    p.add_argument("--interval-s", type=float, default=d.interval_s, help="seconds between two looks")
    p.add_argument("--log-every-s", type=float, default=d.log_every_s, help="seconds between two progress lines")
    a = p.parse_args(argv)
    if a.interval_s <= 0 or a.timeout_s < 0:
        p.error("--interval-s must be > 0 and --timeout-s >= 0")
    return WaitConfig(**vars(a))


def wait(cfg: WaitConfig, clock=time.monotonic, sleep=time.sleep) -> bool:
    """Look every interval until the check passes (True) or the timeout runs out (False)."""
    check = CHECKS[cfg.what]
    start = clock()
    last_log = None
    while True:
        reason = check(cfg.path)
        now = clock()
        if reason is None:
            log.info("%s ready at %s after %.0f s", cfg.what, cfg.path, now - start)
            return True
        if cfg.timeout_s and now - start >= cfg.timeout_s:
            log.error("gave up after %.0f s: %s", now - start, reason)
            return False
        if last_log is None or now - last_log >= cfg.log_every_s:
            log.info("waiting for %s (%.0f s so far): %s", cfg.what, now - start, reason)
            last_log = now
        sleep(cfg.interval_s)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    return 0 if wait(parse_args(argv)) else 1


if __name__ == "__main__":
    sys.exit(main())
