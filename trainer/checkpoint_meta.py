"""Contract 2's metadata, typed: `CheckpointMeta` is model.json (and `ShardsMeta` its `shards`
block), with its format tag and version; `CheckpointMeta.from_json` is the one reader of
model.json and refuses what this version cannot read. The files themselves (save, load,
pointer) are trainer.checkpoint's; nothing else indexes the metadata's keys."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.transforms import Normalization
from trainer.model import AlexNetConfig

META = "model.json"
FORMAT = "alexnet-2012/checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    pass


@dataclass(frozen=True)
class ShardsMeta:
    """model.json's `shards` block: which shard set trained the model and how its JPEGs were
    made (serving re-encodes requests at the same quality). Any of it may be unknown (None)."""

    path: str | None = None
    image_size: int | None = None
    jpeg_quality: int | None = None
    plan_fingerprint: str | None = None

    @classmethod
    def of(cls, root: Path | str, manifest: dict) -> ShardsMeta:
        """From a shard set's root and manifest.json (contract 1)."""
        return cls(
            path=str(root),
            image_size=manifest.get("image_size"),
            jpeg_quality=manifest.get("jpeg_quality"),
            plan_fingerprint=manifest.get("plan_fingerprint"),
        )

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> ShardsMeta:
        return cls(**{k: d.get(k) for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class CheckpointMeta:
    """model.json, typed: what serving, evaluation, the figures and resume read of a checkpoint.

    `train_config` is the trainer's own record of the run's configuration, kept as written
    (trainer.config reads it, whatever its age); everything else is typed here."""

    architecture: AlexNetConfig
    classes: list[dict]  # [{index, wnid, name}], index order
    normalization: Normalization
    epoch: int = 0
    metrics: dict = field(default_factory=dict)
    shards: ShardsMeta | None = None
    run: str | None = None  # the run's name
    train_config: dict | None = None

    @property
    def input_size(self) -> int:
        return self.architecture.input_size

    @property
    def jpeg_quality(self) -> int | None:
        """The shard set's JPEG quality, where the checkpoint records it."""
        return self.shards.jpeg_quality if self.shards is not None else None

    @property
    def wnids(self) -> list[str]:
        return [c["wnid"] for c in self.classes]

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "architecture": asdict(self.architecture),
            "classes": self.classes,
            "normalization": self.normalization.to_json(),
            "input_size": self.input_size,
            "epoch": self.epoch,
            "metrics": self.metrics,
            "shards": self.shards.to_json() if self.shards is not None else None,
            "run": self.run,
            "train_config": self.train_config,
        }

    @classmethod
    def from_json(cls, d: Any, where: str = META) -> CheckpointMeta:
        """model.json's content, checked: format, a version this code reads, an architecture
        that builds, a class list that fits it; else CheckpointError saying what is wrong."""
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            kind = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise CheckpointError(f"{where} is not an {FORMAT} file (format={kind!r})")
        version = d.get("format_version", 0)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CheckpointError(
                f"{where} was written by a newer version (format_version {version}); this code "
                f"reads up to {FORMAT_VERSION}"
            )
        try:
            architecture = AlexNetConfig.from_dict(d["architecture"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{where}: bad architecture: {exc}") from None
        classes = d.get("classes") or []
        if len(classes) != architecture.num_classes:
            raise CheckpointError(f"{where}: {len(classes)} classes listed for a {architecture.num_classes}-way model")
        try:
            normalization = Normalization.from_json(d["normalization"])
            shards = ShardsMeta.from_json(d["shards"]) if d.get("shards") else None
            return cls(
                architecture=architecture,
                classes=list(classes),
                normalization=normalization,
                epoch=int(d.get("epoch") or 0),
                metrics=dict(d.get("metrics") or {}),
                shards=shards,
                run=d.get("run"),
                train_config=d.get("train_config"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{where}: bad metadata: {type(exc).__name__}: {exc}") from None
