"""Typed settings of the prediction service; every field can come from an environment
variable ALEXNET_<FIELD> (e.g. ALEXNET_CHECKPOINT, ALEXNET_PORT, ALEXNET_TOKEN)."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

ENV_PREFIX = "ALEXNET_"


@dataclass(frozen=True)
class Settings:
    checkpoint: Path = Path("checkpoint")
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    max_upload_bytes: int = 10 * 1024 * 1024  # larger bodies get 413
    max_pixels: int = 40_000_000  # decoded-size guard (decompression bombs, absurd dimensions)
    max_side: int = 20_000  # either side longer than this: 400 (absurd dimensions)
    max_batch: int = 32  # micro-batching: at most this many images per forward pass
    max_wait_ms: float = 5.0  # ... collected for at most this long after the first arrives
    batching: bool = True
    token: str | None = None  # bearer token; None = no auth
    max_k: int = 100
    index: Path | None = None  # a folder of images or a shard set, indexed at start-up for /similar
    index_split: str = "val"  # which split of a shard set
    # Roots under which POST /index may index on request (os.pathsep-separated); empty = off,
    # since it makes the server read files from its own disk.
    index_roots: str = ""
    # Given a run folder: look for a newer checkpoint every watch_s seconds (0 = never) and
    # switch to it without a restart (training and serving side by side).
    watch_s: float = 0.0
    run_dir: Path | None = None  # set by `python -m serving` when --checkpoint is a run folder

    @classmethod
    def from_env(cls, **overrides) -> "Settings":
        values: dict = {}
        for f in fields(cls):
            raw = os.environ.get(ENV_PREFIX + f.name.upper())
            if raw is None:
                continue
            typ = f.type if isinstance(f.type, str) else f.type.__name__
            if "bool" in typ:
                values[f.name] = raw.lower() in ("1", "true", "yes", "on")
            elif "int" in typ:
                values[f.name] = int(raw)
            elif "float" in typ:
                values[f.name] = float(raw)
            elif "Path" in typ:
                values[f.name] = Path(raw)
            else:
                values[f.name] = raw or None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
