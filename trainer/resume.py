"""Resuming a run: what a checkpoint carries to continue training, where a worker resumes
from, and what a resubmitted run may change. No Ray here except inside `resume_source`.

What happens when a run is submitted again (the same --name and --storage-path), say with
another --lr:

1. The driver (trainer.run.fit, before any worker starts) compares the settings with what
   the run was trained with (`stored_config`: its newest checkpoint's own record, else
   config.json, else --resume's checkpoint) with `judge_changes`: differences in
   FREE_TO_CHANGE pass (--epochs only says where the run stops); ARCHITECTURE never changes
   (the weights depend on it: --fresh or a new --name); anything else is refused, naming
   each field, unless --allow-changes. IDENTITY fields name the run and are never a change.
2. Once nothing can refuse the submission any more, `record_config` writes config.json and
   appends what changed, and from which epoch, to config_changes.jsonl.
3. Each worker (`resume`) loads the checkpoint's weights into the model it built, then the
   optimizer, the schedule, the epoch count, the lr drops, the divergence guard and its own
   RNG streams; then `apply_changes`: a changed lr rescales the current one (drops already
   taken are kept: 0.01 dropped once to 0.001, resubmitted with --lr 0.02, goes on at
   0.002), momentum and weight decay take their new values, the schedule its new factor,
   patience and floor, all from the next epoch.

The resume state: `train_state.pt` (rank 0: `train_state_payload`) and one
`rank_state_R.pt` per rank (`rank_state_payload`), read with torch.load(weights_only=True).
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from trainer import checkpoint as ckpt_io
from trainer import checkpoint_meta as ckpt_meta
from trainer.config import RecipeConfig, TrainConfig, flat
from trainer.guard import DivergenceGuard
from trainer.model import AlexNet, AlexNetConfig
from trainer.optim import build_optimizer, build_scheduler, min_lr
from trainer.runfolder import CONFIG, CONFIG_CHANGES, RunFolder
from trainer.seeds import capture_rng, epoch_seed, restore_rng, seed_rank

log = logging.getLogger("trainer.resume")

# Settings a resubmitted run may change without --allow-changes: none of them can change the
# weights a run ends with (--epochs only says where it stops).
FREE_TO_CHANGE = frozenset(
    {"epochs", "max_failures", "keep_checkpoints", "print_freq", "ray_reports", "divergence_guard", "resume_from"}
)
# Settings that name the run rather than describe its training: never a change.
IDENTITY = frozenset({"name", "storage_path"})
# Settings a checkpoint's weights depend on (the model section, but for its initialisation):
# never changed on a resumed run.
ARCHITECTURE = frozenset(f.name for f in fields(AlexNetConfig)) - {"init"}


class ChangesRefused(RuntimeError):
    """A resubmission whose settings differ from the run's in a way it may not."""


def config_changes(stored: dict[str, Any], cfg: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """{setting: (stored value, new value)} for every setting that differs, except
    FREE_TO_CHANGE and IDENTITY; `stored` in either form config.json has had. A setting the
    stored config does not have yet is not a change."""
    old, new = flat(stored), cfg.flat()
    return {
        k: (old[k], new[k])
        for k in sorted(new)
        if k not in FREE_TO_CHANGE and k not in IDENTITY and k in old and old[k] != new[k]
    }


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    """`field: old -> new; ...`, the one wording of config_changes in errors and logs."""
    return "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())


def stored_config(run: RunFolder, cfg: TrainConfig, *, fresh: bool = False) -> tuple[dict | None, str]:
    """What the run was trained with, and what to call it: its newest checkpoint's own record
    (config.json can be ahead of it when an --allow-changes submission never reached a
    checkpoint), else config.json, else --resume's checkpoint; (None, "") for a new run.
    With --fresh the run's own files do not count (they are about to go)."""
    if not fresh:
        pointer = ckpt_io.parse_pointer(run.read_text(ckpt_io.POINTER))
        if pointer is not None:
            text = run.read_text(f"{pointer['checkpoint']}/{ckpt_meta.META}")
            meta = ckpt_meta.CheckpointMeta.from_json(json.loads(text)) if text else None
            if meta is not None and meta.train_config:
                return meta.train_config, f"run {run.uri} (checkpoint {pointer['checkpoint']})"
        text = run.read_text(CONFIG)
        if text is not None:
            return json.loads(text), f"run {run.uri}"
    if cfg.runtime.resume_from:
        meta = ckpt_io.read_meta(ckpt_io.resolve(cfg.runtime.resume_from).checkpoint)
        return meta.train_config or {}, f"checkpoint {cfg.runtime.resume_from}"
    return None, ""


def judge_changes(
    run: RunFolder, cfg: TrainConfig, allow_changes: bool, *, fresh: bool = False
) -> dict[str, tuple[Any, Any]]:
    """A resumed run keeps its settings unless told otherwise: the differences from what it was
    trained with, refused (ChangesRefused naming each) unless --allow-changes. Reads only."""
    stored, what = stored_config(run, cfg, fresh=fresh)
    if stored is None:
        return {}
    changes = config_changes(stored, cfg)
    listed = describe_changes(changes)
    fixed = sorted(ARCHITECTURE & set(changes))
    if fixed:
        raise ChangesRefused(
            f"{what} has a different architecture ({listed}); {', '.join(fixed)} cannot change "
            "on a resumed run: use --fresh or a new --name"
        )
    if changes and not allow_changes:
        raise ChangesRefused(
            f"{what} was trained with other settings: {listed}. Resubmit with the stored values, "
            "add --allow-changes to apply the new ones from the next epoch, or --fresh to start "
            "over"
        )
    return changes


def record_config(run: RunFolder, cfg: TrainConfig, changes: dict[str, tuple[Any, Any]]) -> None:
    """Once nothing can refuse the submission any more: config.json, and what changed when."""
    if changes:
        log.warning("applying changed settings (--allow-changes): %s", describe_changes(changes))
        pointer = ckpt_io.parse_pointer(run.read_text(ckpt_io.POINTER)) or {}
        run.append_text(
            CONFIG_CHANGES,
            json.dumps(
                {
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "after_epoch": pointer.get("epoch", 0),
                    "changes": {k: list(v) for k, v in changes.items()},
                },
                sort_keys=True,
            )
            + "\n",
        )
    run.write_text(CONFIG, json.dumps(cfg.to_json(), indent=2, sort_keys=True) + "\n")


def apply_changes(optimizer: torch.optim.Optimizer, scheduler: Any, old: RecipeConfig, new: RecipeConfig) -> None:
    """Make a resumed run's optimizer and schedule follow a changed recipe (--allow-changes).
    A changed lr rescales the current one (drops already taken are kept)."""
    if new.lr != old.lr:
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * new.lr / old.lr
    for group in optimizer.param_groups:
        group["momentum"] = new.momentum
        group["weight_decay"] = new.weight_decay if (group.get("name") != "biases" or new.decay_biases) else 0.0
    scheduler.factor = new.lr_factor
    scheduler.patience = new.lr_patience
    scheduler.min_lrs = [min_lr(new)] * len(optimizer.param_groups)


@dataclass
class State:
    """What a worker trains and what a checkpoint restores."""

    model: torch.nn.Module  # the AlexNet, DDP-wrapped once the worker is set up
    optimizer: torch.optim.Optimizer
    scheduler: Any
    epoch: int = 0  # epochs done
    lr_drops: int = 0
    guard: DivergenceGuard = field(default_factory=DivergenceGuard)
    last_checkpoint: str | None = None  # for the divergence message


def new_state(recipe: RecipeConfig, model: AlexNet) -> State:
    optimizer = build_optimizer(model, recipe)
    return State(model=model, optimizer=optimizer, scheduler=build_scheduler(optimizer, recipe))


def train_state_payload(state: State, cfg: TrainConfig, world: int) -> dict:
    """The shared resume state (rank 0 writes it): loads with torch.load(weights_only=True)."""
    return {
        "epoch": state.epoch,
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "lr_drops": state.lr_drops,
        "guard": state.guard.state_dict(),
        "config": cfg.to_json(),
        "world_size": world,
    }


def rank_state_payload(state: State, rank: int, devices: list[torch.device]) -> dict:
    return {"rank": rank, "epoch": state.epoch, "rng": capture_rng(devices)}


def save_rank_state(folder: Path, rank: int, state: dict) -> Path:
    """One data-parallel rank's own resume state (its RNG states) into a checkpoint folder."""
    path = Path(folder) / ckpt_io.RANK_STATE.format(rank=rank)
    ckpt_io.write_file(path, lambda p: torch.save(state, p))
    return path


def _load_weights_only(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle that needs more than tensors and plain data is refused here
        lines = [x.strip() for x in str(exc).splitlines() if x.strip()]
        why = next((x for x in lines if "WeightsUnpickler error" in x), lines[0] if lines else type(exc).__name__)
        raise ckpt_meta.CheckpointError(
            f"{path} is not a resume state that loads without unpickling code: {why}"
        ) from None


def load_train_state(folder: Path) -> dict:
    """The shared resume state (optimizer, schedule, epoch, ...), loaded weights-only."""
    path = Path(folder) / ckpt_io.TRAIN_STATE
    if not path.is_file():
        raise ckpt_meta.CheckpointError(f"{folder} has no {ckpt_io.TRAIN_STATE}: it cannot resume training")
    return _load_weights_only(path)


def load_rank_state(folder: Path, rank: int) -> dict | None:
    """Rank's own resume state, or None if the checkpoint has none for it (fewer workers then)."""
    path = Path(folder) / ckpt_io.RANK_STATE.format(rank=rank)
    return _load_weights_only(path) if path.is_file() else None


def resume(
    state: State, folder: Path, cfg: TrainConfig, rank: int, devices: list[torch.device]
) -> ckpt_meta.CheckpointMeta:
    """Put a checkpoint back into `state` (its model not yet wrapped): the weights, into the
    model it has; optimizer, schedule, guard, this rank's RNG streams; then what the
    (driver-approved) config changes. Returns the checkpoint's metadata."""
    meta = ckpt_io.load_weights(folder, ckpt_io.unwrap(state.model))
    shared = load_train_state(folder)
    if int(shared["epoch"]) != meta.epoch:
        raise ckpt_meta.CheckpointError(
            f"{folder}: {ckpt_io.TRAIN_STATE} is of epoch {shared['epoch']}, {ckpt_meta.META} of epoch {meta.epoch}"
        )
    state.optimizer.load_state_dict(shared["optimizer"])
    state.scheduler.load_state_dict(shared["scheduler"])
    state.epoch, state.lr_drops = int(shared["epoch"]), int(shared["lr_drops"])
    state.guard.load_state_dict(shared["guard"])
    changes = config_changes(shared["config"], cfg)
    if changes:
        apply_changes(state.optimizer, state.scheduler, TrainConfig.from_json(shared["config"]).recipe, cfg.recipe)
        if rank == 0:
            log.info(
                "applying changed settings from epoch %d: %s",
                state.epoch + 1,
                ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()),
            )
    own = load_rank_state(folder, rank)
    try:
        if own is None:
            raise ValueError(f"it has no state for rank {rank}")
        restore_rng(own["rng"], devices)
    except ValueError as exc:  # a changed worker count or device layout (--allow-changes)
        log.warning("rank %d: fresh random streams, not the checkpoint's (%s)", rank, exc)
        seed_rank(epoch_seed(cfg.recipe.seed, state.epoch, rank, "rng"), rank)  # deterministic all the same
    state.last_checkpoint = str(folder)
    return meta


def resume_source(cfg: TrainConfig, run: RunFolder):
    """The checkpoint to resume from, as (a context manager giving a local folder, its name):
    the run's newest, else --resume PATH; (None, None) for a new run.

    The run's newest is the later of Ray's registered checkpoint and the one
    latest_checkpoint.json names: a worker killed right after a checkpoint can restart before
    Ray's controller has registered it, and the pointer is written only once every rank's
    part is persisted."""
    import ray.train

    candidates = []
    registered = ray.train.get_checkpoint()
    if registered is not None:
        candidates.append((ckpt_io.epoch_of(registered.path) or 0, registered))
    pointer = ckpt_io.parse_pointer(run.read_text(ckpt_io.POINTER))
    if pointer is not None:
        path = run.path(pointer["checkpoint"])
        candidates.append((pointer["epoch"], ray.train.Checkpoint(path=path, filesystem=run.fs)))
    if candidates:
        _, newest = max(candidates, key=lambda c: c[0])
        return newest.as_directory(), newest.path
    if cfg.runtime.resume_from:
        local = ckpt_io.resolve(cfg.runtime.resume_from).checkpoint

        @contextmanager
        def as_directory():
            yield str(local)

        return as_directory(), str(local)
    return None, None
