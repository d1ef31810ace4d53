"""Contract 2: the checkpoint folder, written by the trainer, read by serving.

    model.safetensors   weights only (safetensors: loading never unpickles anything)
    model.json          architecture (AlexNetConfig), classes, normalisation, epoch, metrics
    train_state.pt      optimizer, LR scheduler, epoch, RNG states: for resuming training only

Serving needs only the first two. A folder missing either, or whose json does not match
the weights, is refused with a message saying what is wrong.
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
FORMAT = "alexnet-2012/checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    pass


def unwrap(model: torch.nn.Module) -> AlexNet:
    """The AlexNet inside DDP / torch.compile wrappers."""
    while True:
        if isinstance(model, AlexNet):
            return model
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"not an AlexNet: {type(model)}")
        model = inner


def save(folder: Path, model: torch.nn.Module, *, classes: list[dict], normalization: Normalization,
         epoch: int, metrics: dict, train_state: dict | None = None, extra: dict | None = None) -> Path:
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
        **(extra or {}),
    }
    _atomic(folder / WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": FORMAT}))
    _atomic(folder / META, lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
    if train_state is not None:
        _atomic(folder / TRAIN_STATE, lambda p: torch.save(train_state, p))
    return folder


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


def load_train_state(folder: Path) -> dict | None:
    path = Path(folder) / TRAIN_STATE
    if not path.is_file():
        return None
    # Our own file, written by save(); it holds optimizer state and RNG states (not weights).
    return torch.load(path, map_location="cpu", weights_only=False)
