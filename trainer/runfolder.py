"""The run folder, `STORAGE_PATH/NAME/`: Ray Train's checkpoints plus our config.json and
metrics.jsonl (one JSON object per epoch). STORAGE_PATH may be a local folder, a shared
filesystem mounted on every node, or any URI pyarrow understands (s3://, gs://, hdfs://),
the same storage Ray Train itself writes checkpoints to.

pyarrow (which Ray brings) is imported only by RunFolder: `latest_checkpoint`, which serving
uses, needs the standard library alone, so a serving-only install can import this module."""

from __future__ import annotations

import json
import os
import posixpath
from pathlib import Path

CONFIG = "config.json"
METRICS = "metrics.jsonl"
CHECKPOINT_PREFIX = "checkpoint_"


class RunFolder:
    def __init__(self, storage_path: str, name: str):
        import pyarrow.fs as pafs

        if "://" in storage_path:
            self.fs, root = pafs.FileSystem.from_uri(storage_path)
        else:
            self.fs, root = pafs.LocalFileSystem(), os.path.abspath(storage_path)
        self.root = posixpath.join(root, name)
        self.uri = storage_path.rstrip("/") + "/" + name if "://" in storage_path else self.root

    @property
    def local_path(self) -> Path | None:
        import pyarrow.fs as pafs

        return Path(self.root) if isinstance(self.fs, pafs.LocalFileSystem) else None

    def _path(self, rel: str) -> str:
        return posixpath.join(self.root, rel)

    def write_text(self, rel: str, text: str) -> None:
        """Write then move into place: readers never see half a file."""
        path = self._path(rel)
        folder, base = posixpath.split(path)
        self.fs.create_dir(folder, recursive=True)
        tmp = posixpath.join(folder, f".{base}.tmp")
        with self.fs.open_output_stream(tmp) as f:
            f.write(text.encode("utf-8"))
        self.fs.move(tmp, path)

    def read_text(self, rel: str) -> str | None:
        try:
            with self.fs.open_input_stream(self._path(rel)) as f:
                return f.read().decode("utf-8")
        except (FileNotFoundError, OSError):
            return None

    def metrics(self) -> list[dict]:
        text = self.read_text(METRICS) or ""
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def append_metrics(self, row: dict) -> None:
        """Add one epoch's line (replacing a line for the same epoch). Lines of epochs a dead
        run wrote past its last checkpoint are dropped on resume by truncate_metrics."""
        rows = [r for r in self.metrics() if r["epoch"] != row["epoch"]] + [row]
        self.write_text(METRICS, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))

    def truncate_metrics(self, until_epoch: int) -> None:
        rows = [r for r in self.metrics() if r["epoch"] <= until_epoch]
        self.write_text(METRICS, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


RAY_CHECKPOINT_INDEX = "checkpoint_manager_snapshot.json"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint Ray Train has registered in a local run folder: listed in its
    checkpoint_manager_snapshot.json (written only once a checkpoint is fully persisted) and
    holding our files. A checkpoint_* folder that is not listed may be half-written: ignored."""
    from trainer.checkpoint import META, WEIGHTS

    try:
        index = json.loads((Path(run_dir) / RAY_CHECKPOINT_INDEX).read_text())
    except (OSError, ValueError):
        return None
    for entry in reversed(index.get("checkpoint_results", [])):
        path = Path(run_dir) / entry.get("checkpoint_dir_name", "")
        if path.name.startswith(CHECKPOINT_PREFIX) and (path / WEIGHTS).is_file() and (path / META).is_file():
            return path
    return None
