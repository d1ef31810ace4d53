"""The /similar index, built off the request path, one build at a time.

`Indexer.start` checks the request at once (the path resolves under the allowed roots, a
shard set's tars too) and then builds in the background: POST /index answers 202, a second
POST while a build runs gets 409, and GET /index or /ready report the state (none,
building, ready, failed; sizes and folder names, never full server paths). A failed build is
logged and reported with its reason. When the model changes (serving.reload) the index is
re-embedded: the running build is stopped and a new one started from the same source.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from pathlib import Path

from pipeline.shardset import MANIFEST
from serving.errors import ApiError
from serving.retrieval import OutsideRoots, build_index, confine, shard_tars
from trainer.retrieval import Cancelled, Index

log = logging.getLogger("serving.indexing")


class Indexer:
    def __init__(self, predictor: Callable[[], object], batch: int, max_images: int):
        self._predictor = predictor  # the current model, whichever it is when a build starts
        self._batch = batch
        self._max_images = max_images
        self.index: Index | None = None
        self.index_model: object | None = None  # the predictor that embedded self.index
        self.state = "none"
        self.error: str | None = None
        self._source: tuple[Path, str, list[Path]] | None = None  # what the last build read
        self._task: asyncio.Task | None = None
        self._stop = threading.Event()

    @property
    def building(self) -> bool:
        return self._task is not None and not self._task.done()

    def status(self) -> dict:
        """The last build's state (and its error), and the size and folder name of the index
        in service, if any (a failed rebuild leaves the previous index in service)."""
        out: dict = {"state": self.state}
        if self.index is not None:
            out.update(
                size=len(self.index.keys), source=self.index.source, truncated=len(self.index.keys) >= self._max_images
            )
        if self.error:
            out["error"] = self.error
        return out

    def start(self, path: Path | str, split: str, roots: list[Path]) -> dict:
        """Check `path` now (ApiError 403/400/409), then build in the background."""
        if self.building:
            raise ApiError(409, "index_busy", "an index is being built; GET /index shows its progress")
        if not roots:
            raise ApiError(403, "forbidden_path", "indexing on request is off: set index_roots")
        try:
            target = confine(Path(path), roots)
            if not target.exists():
                raise FileNotFoundError(f"{path} does not exist")
            if (target / MANIFEST).is_file():
                shard_tars(target, split, roots)  # every tar the manifest names must lie under the roots
            elif not target.is_dir():
                raise FileNotFoundError(f"{path} is neither a folder nor a shard set")
        except OutsideRoots:
            raise ApiError(
                403,
                "forbidden_path",
                "that path (or a file it names) is outside the roots this server indexes on request",
            ) from None
        except (OSError, ValueError, KeyError) as exc:
            raise ApiError(400, "cannot_index", str(exc)) from None
        self._launch(target, split, roots)
        return self.status()

    def start_configured(self, path: Path, split: str) -> None:
        """The operator's ALEXNET_INDEX at start-up: confined to itself."""
        target = Path(path).resolve()
        self._launch(target, split, [target])

    def rebuild(self) -> None:
        """Re-embed the current source with the current model (the model changed)."""
        if self._source is not None:
            self.index = None
            self._launch(*self._source)

    def _launch(self, target: Path, split: str, roots: list[Path]) -> None:
        self.cancel()
        self._stop = threading.Event()
        self._source = (target, split, roots)
        self.state, self.error = "building", None
        self._task = asyncio.create_task(self._build(target, split, roots, self._stop))

    async def _build(self, target: Path, split: str, roots: list[Path], stop: threading.Event) -> None:
        predictor = self._predictor()
        try:
            index = await asyncio.to_thread(
                build_index, target, predictor, split, self._batch, self._max_images, roots, stop
            )
        except Cancelled:
            return
        except Exception as exc:
            log.error("indexing %s failed: %s", target, exc, exc_info=not isinstance(exc, (OSError, ValueError)))
            if not stop.is_set():
                # Reported to API clients: the folder's name, not where it lies on the server.
                self.state, self.error = "failed", f"{type(exc).__name__}: {exc}".replace(str(target), target.name)
            return
        if stop.is_set() or self._predictor() is not predictor:  # replaced meanwhile: a newer build runs
            return
        self.index, self.index_model, self.state = index, predictor, "ready"
        log.info("index ready: %d images from %s", len(index.keys), target)

    def cancel(self) -> None:
        self._stop.set()
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the thread stops at its next image (stop is set)
