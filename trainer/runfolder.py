"""The run folder, `STORAGE_PATH/NAME/`: Ray Train's checkpoint folders (contract 2,
trainer.checkpoint) plus our own files: config.json (the resolved config), config_changes.jsonl
(what --allow-changes changed, and from which epoch), metrics.jsonl (one JSON object per
epoch), latest_checkpoint.json (the newest complete checkpoint) and diverged.json (why the
divergence guard stopped the run). STORAGE_PATH may be a local folder, a shared filesystem
mounted on every node, or any URI pyarrow understands (s3://, gs://, hdfs://), the same
storage Ray Train itself writes checkpoints to. Local readers that must not import pyarrow
(serving) use trainer.checkpoint.latest_checkpoint; pyarrow (which Ray brings) is imported
only inside RunFolder, so a serving-only install can still import this module. metrics.jsonl
has one reader, `parse_metrics` (`read_metrics` for a local run folder)."""

from __future__ import annotations

import json
import os
import posixpath
from pathlib import Path
from typing import Any

from pipeline.atomic import write_atomic

CONFIG = "config.json"
CONFIG_CHANGES = "config_changes.jsonl"
METRICS = "metrics.jsonl"
DIVERGED = "diverged.json"
OUT_OF_SPACE = "out_of_space.json"  # the workers stopped before an epoch whose checkpoint had no room


def parse_metrics(text: str) -> list[dict[str, Any]]:
    """metrics.jsonl's content: one row per epoch, in the order written."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def read_metrics(run_dir: Path | str) -> list[dict[str, Any]]:
    """A local run folder's metrics.jsonl (FileNotFoundError naming it where there is none)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a run folder?")
    return parse_metrics(path.read_text())


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

    def path(self, rel: str) -> str:
        """A path inside the run folder, on self.fs."""
        return posixpath.join(self.root, rel)

    def write_text(self, rel: str, text: str) -> None:
        """Write then move into place: readers never see half a file (locally through
        pipeline.atomic, elsewhere through the filesystem's own move)."""
        if self.local_path is not None:
            write_atomic(self.local_path / rel, text, fsync=False)
            return
        path = self.path(rel)
        folder, base = posixpath.split(path)
        self.fs.create_dir(folder, recursive=True)
        tmp = posixpath.join(folder, f".{base}.tmp")
        with self.fs.open_output_stream(tmp) as f:
            f.write(text.encode("utf-8"))
        self.fs.move(tmp, path)

    def read_text(self, rel: str) -> str | None:
        try:
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read().decode("utf-8")
        except (FileNotFoundError, OSError):
            return None

    def exists(self, rel: str = "") -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self.path(rel) if rel else self.root).type != pafs.FileType.NotFound

    def delete(self, rel: str) -> None:
        """Remove one file of the run folder, if it is there."""
        if self.exists(rel):
            self.fs.delete_file(self.path(rel))

    def delete_all(self) -> None:
        """Remove the whole run folder (--fresh)."""
        if self.exists():
            self.fs.delete_dir(self.root)

    def append_text(self, rel: str, line: str) -> None:
        self.write_text(rel, (self.read_text(rel) or "") + line)

    def metrics(self) -> list[dict[str, Any]]:
        return parse_metrics(self.read_text(METRICS) or "")

    def append_metrics(self, row: dict) -> None:
        """Add one epoch's line (replacing a line for the same epoch). Lines of epochs a dead
        run wrote past its last checkpoint are dropped on resume by truncate_metrics."""
        rows = [r for r in self.metrics() if r["epoch"] != row["epoch"]] + [row]
        self.write_text(METRICS, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))

    def truncate_metrics(self, until_epoch: int) -> None:
        rows = [r for r in self.metrics() if r["epoch"] <= until_epoch]
        self.write_text(METRICS, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
