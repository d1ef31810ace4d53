"""Contract 2: the checkpoint, written by the trainer, read by serving, evaluation and resume.
This module is its one home: save, load, metadata, resume state, newest-checkpoint lookup.
It imports no Ray, pyarrow, DALI or matplotlib, so serving can use it.

A checkpoint folder (`checkpoint_epoch_NNNN`, inside the run folder):

    model.safetensors   weights only (safetensors: loading never unpickles anything)
    model.json          format, architecture (AlexNetConfig), classes, normalisation, input
                        size, epoch, metrics, `shards` (where the data came from and its JPEG
                        quality), `run` (the run name) and `train_config` (the resolved config)
    train_state.pt      resume only: optimizer, LR schedule, epoch, lr drops, guard reference,
                        the config it was trained with; tensors, numbers and strings only
    rank_state_R.pt     resume only, one per data-parallel rank R: that worker's RNG states

The .pt files load with `torch.load(weights_only=True)`: no code runs on loading them.
Serving needs only the first two. A folder missing either, or whose json does not match the
weights, is refused with a message saying what is wrong.

The run folder holds `latest_checkpoint.json`, written by the trainer once every worker has
persisted a checkpoint (so it never names a half-written one): `latest_checkpoint(run)` reads
it. Nothing here reads Ray's own bookkeeping files.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline.transforms import Normalization
from trainer.model import AlexNet, AlexNetConfig

WEIGHTS = "model.safetensors"
META = "model.json"
TRAIN_STATE = "train_state.pt"
RANK_STATE = "rank_state_{rank}.pt"
POINTER = "latest_checkpoint.json"
CHECKPOINT_PREFIX = "checkpoint_"
FORMAT = "alexnet-2012/checkpoint"
POINTER_FORMAT = "alexnet-2012/latest-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    pass


def checkpoint_dir_name(epoch: int) -> str:
    return f"{CHECKPOINT_PREFIX}epoch_{epoch:04d}"


def epoch_of(path: str | Path) -> int | None:
    """The epoch in a checkpoint folder's name (checkpoint_epoch_NNNN), else None."""
    name = Path(str(path)).name
    prefix = f"{CHECKPOINT_PREFIX}epoch_"
    return int(name[len(prefix):]) if name.startswith(prefix) and name[len(prefix):].isdigit() else None


def unwrap(model: torch.nn.Module) -> AlexNet:
    """The AlexNet inside DDP / torch.compile wrappers."""
    while True:
        if isinstance(model, AlexNet):
            return model
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"not an AlexNet: {type(model)}")
        model = inner


def shards_meta(root: Path | str, manifest: dict) -> dict:
    """The `shards` block: which shard set trained the model and how its JPEGs were made
    (serving re-encodes requests at the same quality)."""
    return {"path": str(root), "image_size": manifest.get("image_size"), "jpeg_quality": manifest.get("jpeg_quality"),
            "plan_fingerprint": manifest.get("plan_fingerprint")}


def save(folder: Path, model: torch.nn.Module, *, classes: list[dict], normalization: Normalization,
         epoch: int, metrics: dict, shards: dict | None = None, run: str | None = None,
         train_config: dict | None = None, train_state: dict | None = None) -> Path:
    """Write a checkpoint folder (files are renamed into place: never half-written)."""
    folder.mkdir(parents=True, exist_ok=True)
    net = unwrap(model)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "architecture": asdict(net.cfg),
        "classes": classes,
        "normalization": normalization.to_json(),
        "input_size": net.cfg.input_size,
        "epoch": epoch,
        "metrics": metrics,
        "shards": shards,
        "run": run,
        "train_config": train_config,
    }
    _atomic(folder / WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": FORMAT}))
    _atomic(folder / META, lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
    if train_state is not None:
        _atomic(folder / TRAIN_STATE, lambda p: torch.save(train_state, p))
    return folder


def save_rank_state(folder: Path, rank: int, state: dict) -> Path:
    """One data-parallel rank's own resume state (its RNG states) into a checkpoint folder."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / RANK_STATE.format(rank=rank)
    _atomic(path, lambda p: torch.save(state, p))
    return path


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def read_meta(folder: Path) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} does not exist")
    missing = [f for f in (WEIGHTS, META) if not (folder / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {folder} is incomplete: missing {', '.join(missing)}")
    try:
        meta = json.loads((folder / META).read_text())
    except ValueError as exc:
        raise CheckpointError(f"{folder / META} is not valid JSON: {exc}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{folder / META} is not an {FORMAT} file (format={meta.get('format')!r})")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{folder} was written by a newer version (format_version {meta['format_version']})")
    return meta


def load_model(folder: Path | str, device: str | torch.device = "cpu",
               devices: tuple[str | torch.device, ...] | None = None) -> tuple[AlexNet, dict]:
    """Rebuild the model from model.json and load model.safetensors (weights only).

    Raises CheckpointError if the files are missing, or the weights do not match the
    architecture the json describes (names, shapes), or the class list does not match."""
    folder = Path(folder)
    meta = read_meta(folder)
    try:
        cfg = AlexNetConfig.from_dict(meta["architecture"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{folder / META}: bad architecture: {exc}") from None
    if len(meta.get("classes", [])) != cfg.num_classes:
        raise CheckpointError(f"{folder / META}: {len(meta.get('classes', []))} classes listed for a "
                              f"{cfg.num_classes}-way model")
    try:
        tensors = load_file(str(folder / WEIGHTS), device="cpu")
    except Exception as exc:  # safetensors raises its own error types on corrupt files
        raise CheckpointError(f"{folder / WEIGHTS} is unreadable: {exc}") from None
    model = AlexNet(cfg, devices=devices or (device,) * cfg.columns)
    expected = model.state_dict()
    if set(tensors) != set(expected):
        diff = sorted(set(tensors) ^ set(expected))[:5]
        raise CheckpointError(f"{folder / WEIGHTS} does not match model.json's architecture (e.g. {diff})")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(f"{folder / WEIGHTS}: {name} has shape {tuple(tensor.shape)}, the "
                                  f"architecture needs {tuple(expected[name].shape)}")
    model.load_state_dict(tensors)
    return model.eval(), meta


def _load_weights_only(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle that needs more than tensors and plain data is refused here
        lines = [x.strip() for x in str(exc).splitlines() if x.strip()]
        why = next((x for x in lines if "WeightsUnpickler error" in x), lines[0] if lines else type(exc).__name__)
        raise CheckpointError(f"{path} is not a resume state that loads without unpickling code: {why}") from None


def load_train_state(folder: Path) -> dict:
    """The shared resume state (optimizer, schedule, epoch, ...), loaded weights-only."""
    path = Path(folder) / TRAIN_STATE
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {TRAIN_STATE}: it cannot resume training")
    return _load_weights_only(path)


def load_rank_state(folder: Path, rank: int) -> dict | None:
    """Rank's own resume state, or None if the checkpoint has none for it (fewer workers then)."""
    path = Path(folder) / RANK_STATE.format(rank=rank)
    return _load_weights_only(path) if path.is_file() else None


def pointer_json(checkpoint_name: str, epoch: int) -> str:
    """The run folder's latest_checkpoint.json: the newest complete checkpoint, by folder name
    (relative, so the run folder may be mounted anywhere)."""
    return json.dumps({"format": POINTER_FORMAT, "checkpoint": checkpoint_name, "epoch": epoch}) + "\n"


def parse_pointer(text: str | None) -> dict | None:
    """latest_checkpoint.json's content -> {"checkpoint": folder name, "epoch": int}, or None
    when there is none or it is not one (wrong format, a name that is not a checkpoint folder
    of this run)."""
    try:
        pointer = json.loads(text) if text else None
    except ValueError:
        return None
    if not isinstance(pointer, dict) or pointer.get("format") != POINTER_FORMAT:
        return None
    name = str(pointer.get("checkpoint", ""))
    if not name.startswith(CHECKPOINT_PREFIX) or "/" in name or "\\" in name:
        return None
    try:
        return {"checkpoint": name, "epoch": int(pointer["epoch"])}
    except (KeyError, TypeError, ValueError):
        return None


def latest_checkpoint(run_dir: Path | str) -> Path | None:
    """The newest complete checkpoint of a local run folder, from the pointer file the trainer
    writes once every worker has persisted it; None if there is none (yet)."""
    run_dir = Path(run_dir)
    try:
        pointer = parse_pointer((run_dir / POINTER).read_text())
    except OSError:
        return None
    if pointer is None:
        return None
    path = run_dir / pointer["checkpoint"]
    if not (path / WEIGHTS).is_file() or not (path / META).is_file():
        return None
    return path


def resolve(path: Path | str) -> Path:
    """A checkpoint folder as given, or a run folder's newest checkpoint."""
    path = Path(path)
    if (path / META).is_file():
        return path
    newest = latest_checkpoint(path)
    if newest is None:
        raise CheckpointError(f"{path} is neither a checkpoint folder (no {META}) nor a run folder with a "
                              f"complete checkpoint (no {POINTER})")
    return newest
