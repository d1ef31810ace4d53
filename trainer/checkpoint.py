"""Contract 2: the checkpoint, written by the trainer, read by serving, evaluation and resume.
Its one home: save, load, the typed metadata (`CheckpointMeta`, the one reader of model.json),
the resume state files, the newest-checkpoint pointer. No Ray, pyarrow, DALI or matplotlib.

A checkpoint folder (`checkpoint_epoch_NNNN`, inside the run folder):

    model.safetensors   weights only (safetensors: loading never unpickles anything)
    model.json          `CheckpointMeta`: format and version, architecture (AlexNetConfig),
                        classes, normalisation, input size, epoch, metrics, `shards`
                        (`ShardsMeta`: the shard set and its JPEG quality), `run` (the run
                        name) and `train_config` (the resolved config, as trainer.config wrote it)
    train_state.pt      resume only: optimizer, LR schedule, epoch, lr drops, guard reference,
                        the config it was trained with (trainer.resume writes and reads it)
    rank_state_R.pt     resume only, one per data-parallel rank R: that worker's RNG states

The .pt files load with `torch.load(weights_only=True)`: no code runs on loading them. Serving
needs only the first two; a folder missing either, whose json is not one this version reads,
or whose weights do not match the json, is refused with a message saying what is wrong.
`latest_checkpoint.json` in the run folder, written once every worker has persisted a
checkpoint, names the newest complete one (`latest_checkpoint`); Ray's own files are not read.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline.atomic import replacing
from pipeline.transforms import Normalization
from trainer.checkpoint_meta import FORMAT, META, CheckpointError, CheckpointMeta, ShardsMeta
from trainer.model import AlexNet

WEIGHTS = "model.safetensors"
TRAIN_STATE = "train_state.pt"
RANK_STATE = "rank_state_{rank}.pt"
POINTER = "latest_checkpoint.json"
CHECKPOINT_PREFIX = "checkpoint_"
POINTER_FORMAT = "alexnet-2012/latest-checkpoint"


def checkpoint_dir_name(epoch: int) -> str:
    return f"{CHECKPOINT_PREFIX}epoch_{epoch:04d}"


def epoch_of(path: str | Path) -> int | None:
    """The epoch in a checkpoint folder's name (checkpoint_epoch_NNNN), else None."""
    name = Path(str(path)).name
    prefix = f"{CHECKPOINT_PREFIX}epoch_"
    return int(name[len(prefix) :]) if name.startswith(prefix) and name[len(prefix) :].isdigit() else None


def unwrap(model: torch.nn.Module) -> AlexNet:
    """The AlexNet inside DDP / torch.compile wrappers."""
    while True:
        if isinstance(model, AlexNet):
            return model
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"not an AlexNet: {type(model)}")
        model = inner


def save(
    folder: Path,
    model: torch.nn.Module,
    *,
    classes: list[dict],
    normalization: Normalization,
    epoch: int,
    metrics: dict,
    shards: ShardsMeta | None = None,
    run: str | None = None,
    train_config: dict | None = None,
    train_state: dict | None = None,
) -> Path:
    """Write a checkpoint folder (files are renamed into place: never half-written)."""
    folder.mkdir(parents=True, exist_ok=True)
    net = unwrap(model)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    meta = CheckpointMeta(
        architecture=net.cfg,
        classes=classes,
        normalization=normalization,
        epoch=epoch,
        metrics=metrics,
        shards=shards,
        run=run,
        train_config=train_config,
    )
    write_file(folder / WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": FORMAT}))
    write_file(folder / META, lambda p: p.write_text(json.dumps(meta.to_json(), indent=2) + "\n"))
    if train_state is not None:
        write_file(folder / TRAIN_STATE, lambda p: torch.save(train_state, p))
    return folder


def write_file(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` writes the file; it is then renamed onto `path` (pipeline.atomic)."""
    with replacing(path) as tmp:
        write(tmp)


def read_meta(folder: Path | str) -> CheckpointMeta:
    """A checkpoint folder's model.json, checked (the folder must hold the weights too)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} does not exist")
    missing = [f for f in (WEIGHTS, META) if not (folder / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {folder} is incomplete: missing {', '.join(missing)}")
    try:
        doc = json.loads((folder / META).read_text())
    except ValueError as exc:
        raise CheckpointError(f"{folder / META} is not valid JSON: {exc}") from None
    return CheckpointMeta.from_json(doc, where=str(folder / META))


def load_weights(folder: Path | str, model: AlexNet) -> CheckpointMeta:
    """Load a checkpoint's weights (safetensors: nothing unpickled) into `model`, in place, on
    its own devices; returns the checkpoint's metadata. Raises CheckpointError if the files are
    missing or the weights do not fit the model (names, shapes)."""
    folder = Path(folder)
    meta = read_meta(folder)
    try:
        tensors = load_file(str(folder / WEIGHTS), device="cpu")
    except Exception as exc:  # safetensors raises its own error types on corrupt files
        raise CheckpointError(f"{folder / WEIGHTS} is unreadable: {exc}") from None
    expected = model.state_dict()
    if set(tensors) != set(expected):
        diff = sorted(set(tensors) ^ set(expected))[:5]
        raise CheckpointError(f"{folder / WEIGHTS} does not match model.json's architecture (e.g. {diff})")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{folder / WEIGHTS}: {name} has shape {tuple(tensor.shape)}, the "
                f"architecture needs {tuple(expected[name].shape)}"
            )
    model.load_state_dict(tensors)
    return meta


def load_model(
    folder: Path | str, device: str | torch.device = "cpu", devices: tuple[str | torch.device, ...] | None = None
) -> tuple[AlexNet, CheckpointMeta]:
    """Rebuild the model model.json describes and load model.safetensors into it (eval mode).

    Raises CheckpointError if the files are missing, or the weights do not match the
    architecture the json describes (names, shapes), or the class list does not match."""
    meta = read_meta(folder)
    model = AlexNet(meta.architecture, devices=devices or (device,) * meta.architecture.columns)
    load_weights(folder, model)
    return model.eval(), meta


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


@dataclass(frozen=True)
class Resolved:
    """What a path given as "a checkpoint or a run folder" names."""

    checkpoint: Path  # the checkpoint folder
    run_dir: Path | None  # the run folder, when a run folder was given (its newer checkpoints follow)


def resolve(path: Path | str) -> Resolved:
    """A checkpoint folder as given; a run folder's newest checkpoint (and the run folder); or,
    in a folder of run folders (a storage path: $ALEXNET_HOME/runs), the newest checkpoint of
    the run that wrote one last (and that run's folder)."""
    path = Path(path)
    if (path / META).is_file():
        return Resolved(path, None)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    newest = latest_checkpoint(path)
    if newest is not None:
        return Resolved(newest, path)
    finished = [(run, latest) for run in sorted(path.iterdir()) if (latest := latest_checkpoint(run)) is not None]
    if finished:
        run, latest = max(finished, key=lambda found: (found[0] / POINTER).stat().st_mtime)
        return Resolved(latest, run)
    raise CheckpointError(
        f"{path} is neither a checkpoint folder (no {META}) nor a run folder with a complete checkpoint "
        f"(no {POINTER}), nor a folder of run folders with one"
    )
