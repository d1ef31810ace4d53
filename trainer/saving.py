"""What a Ray Train worker writes at the end of an epoch: its part of the checkpoint, and,
when the divergence guard stops the run, the report saying why; and, before an epoch, whether
there is room for that epoch's checkpoint at all (`check_room`).

Every epoch every worker calls ray.train.report (a barrier) with its part of the checkpoint:
rank 0 the model, model.json and the shared resume state, every rank its own RNG states; Ray
merges the parts into one folder (the same `checkpoint_dir_name`). Once every rank's upload
has returned, rank 0 points latest_checkpoint.json at it (contract 2: trainer.checkpoint).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipeline.atomic import OutOfSpace, free_bytes
from trainer import checkpoint as ckpt_io
from trainer import checkpoint_meta as ckpt_meta
from trainer.context import WorkerContext
from trainer.resume import State, rank_state_payload, save_rank_state, train_state_payload
from trainer.runfolder import DIVERGED, OUT_OF_SPACE

log = logging.getLogger("trainer.saving")


def checkpoint_bytes(state: State, ctx: WorkerContext) -> int:
    """About what the next checkpoint writes: the newest one's files where there is one, else
    the weights and the optimizer's momentum (one of each per parameter) and a margin."""
    newest = ckpt_io.latest_checkpoint(ctx.run.local_path) if ctx.run.local_path is not None else None
    if newest is not None:
        return sum(f.stat().st_size for f in newest.iterdir() if f.is_file())
    params = sum(p.numel() * p.element_size() for p in ckpt_io.unwrap(state.model).parameters())
    return 2 * params + (1 << 20)


def check_room(state: State, ctx: WorkerContext) -> OutOfSpace | None:
    """Before an epoch, on every rank alike: is there room for its checkpoint, in the worker's
    temporary folder (where the parts are written) and in a local run folder (where Ray copies
    them; the newest one stays until the new one is in)? Rank 0 measures and tells the others
    (a tensor, never a pickle), so that every rank stops together rather than train an epoch
    it cannot keep. A remote run folder (s3://...) is not measured."""
    verdict = torch.zeros(2, dtype=torch.int64)  # (free, needed) of the place that lacks room
    where: Path | None = None
    if ctx.leader:
        needed = checkpoint_bytes(state, ctx)
        places = [Path(tempfile.gettempdir())] + ([ctx.run.local_path] if ctx.run.local_path is not None else [])
        for place in places:
            free = free_bytes(place)
            if free is not None and free < needed:
                verdict, where = torch.tensor([free, needed]), place
                break
    if ctx.world > 1:
        verdict = verdict.to(ctx.device)
        dist.broadcast(verdict, src=0)
    free, needed = (int(v) for v in verdict.cpu())
    if needed == 0:
        return None
    return OutOfSpace(where if where is not None else ctx.run.uri, free, needed)


def stop_out_of_space(ctx: WorkerContext, full: OutOfSpace) -> None:
    """Every rank ends the loop; rank 0 says why, in the log and in the run folder (a few
    hundred bytes: where even that fails, the OutOfSpace raised instead reaches the driver
    through Ray). The driver turns it into its one line and exit status (trainer.failures)."""
    if ctx.leader:
        log.error("stopping before the next epoch: %s", full)
        ctx.run.write_text(OUT_OF_SPACE, json.dumps({"reason": str(full)}) + "\n")


def save_checkpoint(state: State, ctx: WorkerContext, metrics: dict[str, Any]) -> None:
    """Every rank writes its part and reports it (Ray merges the parts into one folder); once
    every rank's upload has returned, rank 0 points latest_checkpoint.json at it."""
    import ray.train

    cfg, shards = ctx.cfg, ctx.shards
    name = ckpt_io.checkpoint_dir_name(state.epoch)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if ctx.leader:
            ckpt_io.save(
                folder,
                state.model,
                classes=shards.manifest["classes"],
                normalization=shards.normalization(cfg.input.divide_by_std),
                epoch=state.epoch,
                metrics=metrics,
                shards=ckpt_meta.ShardsMeta.of(shards.root, shards.manifest),
                run=cfg.runtime.name,
                train_config=cfg.to_json(),
                train_state=train_state_payload(state, cfg, ctx.world),
            )
        save_rank_state(folder, ctx.rank, rank_state_payload(state, ctx.rank, ctx.devices))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
    if ctx.world > 1:
        dist.barrier()
    if ctx.leader:
        ctx.run.write_text(ckpt_io.POINTER, ckpt_io.pointer_json(name, state.epoch))
    state.last_checkpoint = ctx.run.uri + "/" + name


def report_divergence(state: State, ctx: WorkerContext, step: int, reason: str) -> None:
    """The guard stopped the run: rank 0 writes diverged.json (the driver turns it into exit
    status 3 and its message) and says so."""
    if not ctx.leader:
        return
    report = {"epoch": state.epoch + 1, "step": step, "reason": reason, "last_good_checkpoint": state.last_checkpoint}
    ctx.run.write_text(DIVERGED, json.dumps(report, indent=2) + "\n")
    log.error(
        "stopping: %s (epoch %d, step %d); last good checkpoint: %s",
        reason,
        state.epoch + 1,
        step,
        state.last_checkpoint or "none",
    )
