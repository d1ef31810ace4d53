"""`python -m serving --checkpoint PATH`: the prediction service on uvicorn.

Settings come from flags, else ALEXNET_* environment variables (serving/settings.py), else
defaults. The checkpoint is checked before the server starts: a missing, incomplete or
mismatched one is a clear error and exit status 2, not a server that answers 500s.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger("serving")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m serving", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, help="checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--max-batch", type=int)
    p.add_argument("--max-wait-ms", type=float)
    p.add_argument("--no-batching", dest="batching", action="store_const", const=False, default=None)
    p.add_argument("--max-upload-bytes", type=int)
    p.add_argument("--watch-s", type=float,
                   help="with a run folder: switch to a newer checkpoint when one appears, checking every N s")
    a = p.parse_args(argv)

    import uvicorn

    from serving.app import create_app
    from serving.settings import Settings
    from trainer.checkpoint import CheckpointError, read_meta
    from trainer.checkpoint import latest_checkpoint

    settings = Settings.from_env(**{k: v for k, v in vars(a).items() if v is not None})
    checkpoint, run_dir = settings.checkpoint, None
    if checkpoint.is_dir() and not (checkpoint / "model.json").exists():
        run_dir = checkpoint
        newest = latest_checkpoint(checkpoint)
        if newest is not None:
            checkpoint = newest
    try:
        read_meta(checkpoint)
    except CheckpointError as exc:
        log.error("cannot serve: %s", exc)
        return 2
    from dataclasses import replace

    settings = replace(settings, checkpoint=checkpoint, run_dir=run_dir)
    log.info("serving %s on http://%s:%d (batching %s, max batch %d, auth %s, %s)", checkpoint, settings.host,
             settings.port, "on" if settings.batching else "off", settings.max_batch,
             "on" if settings.token else "off",
             f"newer checkpoints of {run_dir} every {settings.watch_s:g} s" if run_dir and settings.watch_s > 0
             else "this checkpoint only")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
