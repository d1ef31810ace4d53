"""Write one shard: the unit of work a worker process (or a Ray task) does.

Crash safety: the tar and its .idx are written under temporary names and renamed into place;
a small completion record (in OUT/.state/) is renamed into place last. A shard counts as done
only when its record exists and matches both the plan and the files on disk, so `kill -9` at
any moment leaves either a finished shard or one that the next run writes again, to the
same bytes, because every step is deterministic.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.atomic import replacing, write_atomic
from pipeline.preprocess import PREPROCESS_VERSION, ImageError, encode_jpeg, prepare_image
from pipeline.shardset import TAR_SUFFIX, index_path_for, shard_name
from pipeline.stats import PixelMoments
from pipeline.wds import ShardTarWriter

STATE_DIR = ".state"


@dataclass(frozen=True)
class Sample:
    relpath: str
    key: str
    label: int
    wnid: str


@dataclass(frozen=True)
class ShardSpec:
    """Everything needed to write one shard; small and picklable."""

    split: str
    index: int
    samples: tuple[Sample, ...]
    src_root: str
    out_dir: str
    image_size: int
    jpeg_quality: int
    max_pixels: int
    with_stats: bool
    preprocess_version: int = PREPROCESS_VERSION  # in the fingerprint: new pixels, new shards

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index)

    @property
    def tar_path(self) -> Path:
        return Path(self.out_dir) / self.split / f"{self.name}{TAR_SUFFIX}"

    @property
    def record_path(self) -> Path:
        return Path(self.out_dir) / STATE_DIR / self.split / f"{self.name}.json"

    def fingerprint(self) -> str:
        """Identity of the shard's content: changes if any input or setting that shapes its
        bytes changes (not the folders, so a moved source or output stays valid)."""
        doc = {k: v for k, v in asdict(self).items() if k not in ("src_root", "out_dir")}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def read_done_record(spec: ShardSpec) -> dict | None:
    """The completion record, if this shard is finished and its files are intact."""
    try:
        record = json.loads(spec.record_path.read_text())
    except (OSError, ValueError):
        return None
    if record.get("fingerprint") != spec.fingerprint():
        return None
    if record["num_samples"] == 0:
        return record
    tar = spec.tar_path
    if not (tar.is_file() and tar.stat().st_size == record["bytes"] and index_path_for(tar).is_file()):
        return None
    return record


def _read_source(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write_shard(spec: ShardSpec) -> dict:
    """Write (or find already written) one shard; returns its completion record."""
    done = read_done_record(spec)
    if done is not None:
        return dict(done, resumed=True)

    moments = PixelMoments()
    skipped, notes = [], []
    with replacing(spec.tar_path) as tmp_tar:  # renamed into place when the block ends
        writer = ShardTarWriter(tmp_tar)
        for sample in spec.samples:
            try:
                prepared = prepare_image(
                    _read_source(Path(spec.src_root) / sample.relpath), size=spec.image_size, max_pixels=spec.max_pixels
                )
            except ImageError as exc:
                skipped.append({"path": sample.relpath, "reason": exc.reason})
                continue
            except OSError as exc:  # unreadable file (permissions, I/O error): skip, report
                skipped.append({"path": sample.relpath, "reason": f"cannot read file: {exc.strerror or exc}"})
                continue
            if prepared.notes:  # kept, with what was ignored in it
                notes.append({"path": sample.relpath, "note": "; ".join(prepared.notes)})
            meta = json.dumps({"wnid": sample.wnid, "src": sample.relpath}, sort_keys=True)
            writer.add(
                sample.key,
                {
                    "jpg": encode_jpeg(prepared.pixels, spec.jpeg_quality),
                    "cls": str(sample.label).encode("ascii"),
                    "json": meta.encode("utf-8"),
                },
            )
            if spec.with_stats:
                moments.add_image(prepared.pixels)
        nbytes, sha256 = writer.close()
        if writer.num_samples == 0:  # every file in it was bad: no shard at all, never an empty tar
            tmp_tar.unlink()

    record = {
        "fingerprint": spec.fingerprint(),
        "split": spec.split,
        "name": spec.name,
        "num_samples": writer.num_samples,
        "bytes": 0,
        "sha256": None,
        "skipped": skipped,
        "notes": notes,
        "moments": moments.to_json() if spec.with_stats else None,
    }
    if writer.num_samples:
        # The index as DALI's wds2idx writes it (tests/pipeline/test_shard.py holds the two
        # byte-equal), from the offsets recorded while writing: no second pass over the tar.
        write_atomic(index_path_for(spec.tar_path), writer.index_text(), fsync=False)
        record.update(bytes=nbytes, sha256=sha256)
    write_atomic(spec.record_path, json.dumps(record, sort_keys=True))
    return dict(record, resumed=False)
