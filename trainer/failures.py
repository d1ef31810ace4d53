"""What a failed training submission means to the person who submitted it, where the failure
is the machine's rather than the code's: a full disk. Either the workers stopped before an
epoch whose checkpoint would not fit (trainer.saving.check_room: rank 0 leaves
out_of_space.json in the run folder, `StoppedForRoom` here) or a write failed anyway (pipeline.atomic.OutOfSpace, found inside
whatever Ray wrapped it in). Either way: one line that names the path, the space and the
checkpoint the run will resume from once there is room."""

from __future__ import annotations

import json
from collections.abc import Iterator

from pipeline.atomic import OutOfSpace, free_bytes, out_of_space
from trainer.checkpoint import POINTER, parse_pointer
from trainer.config import TrainConfig
from trainer.runfolder import OUT_OF_SPACE, RunFolder


class StoppedForRoom(RuntimeError):
    """The workers stopped before an epoch for lack of room for its checkpoint."""


def raise_if_stopped_for_room(run: RunFolder) -> None:
    """After fit(): did the workers stop for lack of room (they said so in the run folder)?"""
    text = run.read_text(OUT_OF_SPACE)
    if text:
        raise StoppedForRoom(json.loads(text)["reason"])


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception and what Ray Train carries inside it: each worker's failure
    (WorkerGroupError.worker_failures) and the controller's (ControllerError)."""
    yield exc
    failures = getattr(exc, "worker_failures", None)
    if isinstance(failures, dict):
        yield from failures.values()
    controller = getattr(exc, "controller_failure", None)
    if isinstance(controller, BaseException):
        yield controller


def find_out_of_space(exc: BaseException) -> OutOfSpace | StoppedForRoom | None:
    if isinstance(exc, StoppedForRoom):
        return exc
    for cause in _causes(exc):
        full = out_of_space(cause)
        if full is not None:
            return full
    return None


def out_of_space_message(exc: BaseException, cfg: TrainConfig) -> str | None:
    """The one line for a run stopped by a full disk, else None (not this kind of failure)."""
    full = find_out_of_space(exc)
    if full is None:
        return None
    run = RunFolder(cfg.runtime.storage_path, cfg.runtime.name)
    if isinstance(full, OutOfSpace) and not full.path:  # a library's error that named no file (Ray's upload)
        full = OutOfSpace(run.uri, free_bytes(run.local_path) if run.local_path is not None else None)
    pointer = parse_pointer(run.read_text(POINTER))
    where = (
        f"its newest complete checkpoint, {run.uri}/{pointer['checkpoint']} (epoch {pointer['epoch']})"
        if pointer
        else "the start (it has no complete checkpoint yet)"
    )
    return (
        f"training stopped: {full}. Nothing half-written counts as a checkpoint; free some space and submit "
        f"the same command again: run {run.uri} resumes from {where}"
    )
