"""Hot reload: follow a run folder and serve each newer checkpoint without a restart.

Training goes on beside serving; every `watch_s` seconds the run folder's newest registered
checkpoint (trainer.checkpoint.latest_checkpoint: the pointer file the trainer writes once
every worker has persisted a checkpoint, so never a half-written one) is compared with the one being served. A newer one that loads and has the
same `Predictor.signature` (classes, preprocessing) replaces it in one assignment; the
batcher always calls the current predictor, so requests already preprocessed stay valid.
One that fails to load or changes preprocessing is skipped with a warning.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from fastapi import FastAPI

from serving.predictor import Predictor
from serving.settings import Settings

log = logging.getLogger("serving")


async def watch_checkpoints(app: FastAPI, settings: Settings) -> None:
    from trainer.checkpoint import latest_checkpoint

    run_dir = settings.run_dir
    assert run_dir is not None  # create_app watches only a run folder
    failed: set[Path] = set()
    while True:
        await asyncio.sleep(settings.watch_s)
        newest = await asyncio.to_thread(latest_checkpoint, run_dir)
        current: Predictor = app.state.predictor
        if newest is None or newest.resolve() == current.path or newest in failed:
            continue
        try:
            predictor = await asyncio.to_thread(Predictor, newest, settings)
        except Exception as exc:  # e.g. deleted by num_to_keep while loading: try the next one
            log.warning("not switching to %s: %s", newest, exc)
            failed.add(newest)
            continue
        if predictor.signature != current.signature:
            log.warning("not switching to %s: its classes or preprocessing differ from %s", newest, current.path)
            failed.add(newest)
            continue
        # One assignment, no await in between: each request sees the old model or the new one.
        app.state.predictor = predictor
        app.state.metrics.reloads.inc()
        log.info("now serving %s (epoch %s)", newest, predictor.identity["epoch"])
        app.state.indexer.rebuild()  # fc7 distances only mean something within one model
