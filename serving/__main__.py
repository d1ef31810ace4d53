"""`python -m serving --checkpoint PATH`: the prediction service on uvicorn.

Settings come from flags, else ALEXNET_* environment variables or a .env file
(serving/settings.py, which holds every default), else defaults. Settings and the checkpoint
are checked before the server starts: a bad setting (an empty token, say) or a missing,
incomplete or mismatched checkpoint is a clear error and exit status 2, not a server that
answers 500s. Needs only `pip install '.[serving]'` and torch: no Ray, pyarrow, DALI or
matplotlib is imported on this path.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger("serving")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m serving", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, help="checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--max-batch", type=int)
    p.add_argument("--max-wait-ms", type=float)
    p.add_argument("--no-batching", dest="batching", action="store_const", const=False, default=None)
    p.add_argument("--max-upload-bytes", type=int)
    p.add_argument("--max-in-flight", type=int, help="image requests served at once; more get 503")
    p.add_argument("--max-queue-images", type=int, help="images waiting for the batcher; more get 503")
    p.add_argument("--request-timeout-s", type=float, help="deadline of an accepted request (then 503)")
    p.add_argument("--watch-s", type=float,
                   help="with a run folder: switch to a newer checkpoint when one appears, checking every N s")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    a = parse_args(argv)
    from pydantic import ValidationError

    from serving.settings import Settings

    try:
        settings = Settings(**{k: v for k, v in vars(a).items() if v is not None})
    except ValidationError as exc:
        for e in exc.errors():
            where = ".".join(str(p) for p in e["loc"])
            log.error("cannot serve: bad setting%s: %s", f" {where}" if where else "", e["msg"])
        return 2

    import uvicorn

    from serving.app import create_app
    from trainer.checkpoint import META, CheckpointError, latest_checkpoint, read_meta

    checkpoint, run_dir = settings.checkpoint, None
    if checkpoint.is_dir() and not (checkpoint / META).exists():
        run_dir = checkpoint
        newest = latest_checkpoint(checkpoint)
        if newest is not None:
            checkpoint = newest
    try:
        read_meta(checkpoint)
    except CheckpointError as exc:
        log.error("cannot serve: %s", exc)
        return 2
    settings = settings.model_copy(update={"checkpoint": checkpoint, "run_dir": run_dir})
    log.info("serving %s on http://%s:%d (batching %s, max batch %d, auth %s, %s)", checkpoint, settings.host,
             settings.port, "on" if settings.batching else "off", settings.max_batch,
             "on" if settings.auth else "OFF", f"newer checkpoints of {run_dir} every {settings.watch_s:g} s"
             if run_dir and settings.watch_s > 0 else "this checkpoint only")
    log.info("limits: %d requests in flight, %d images queued, %g s deadline, %d decodes at once of at most "
             "%d MiB, uploads up to %d bytes", settings.max_in_flight, settings.max_queue_images,
             settings.request_timeout_s, settings.max_decodes, settings.max_decode_bytes >> 20,
             settings.max_upload_bytes)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info",
                limit_concurrency=settings.max_connections)
    return 0


if __name__ == "__main__":
    sys.exit(main())
