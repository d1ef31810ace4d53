"""Contract 1's one reader: what it accepts, and the clear errors for what it does not."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from pipeline.shardset import FORMAT, FORMAT_VERSION, MANIFEST, STATS, ShardSetError, open_shard_set
from tests.helpers import REPO


def test_reads_what_the_sharder_wrote(shard_set):
    out, manifest = shard_set
    ss = open_shard_set(out, input_size=227)
    assert ss.manifest == manifest and ss.stats == json.loads((out / STATS).read_text())
    assert ss.num_classes == 10 and ss.image_size == 256 and ss.jpeg_quality == 90
    assert ss.splits == ["train", "val"]
    tars, idxs = ss.files("val")
    assert [t.rsplit("/", 1)[1] for t in tars] == ["imagenet-val-000000.tar", "imagenet-val-000001.tar"]
    assert all(i.endswith(".idx") for i in idxs)
    assert ss.num_samples("val") == sum(s["num_samples"] for s in ss.shards("val"))
    with pytest.raises(ShardSetError, match="no 'test' split"):
        ss.shards("test")


@pytest.mark.parametrize(
    "field,value", [("format", "someone-else/shards"), ("format_version", FORMAT_VERSION + 1), ("format", None)]
)
def test_another_format_or_version_is_refused_with_what_was_found(shard_set, tmp_path, field, value):
    out, manifest = shard_set
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    changed = dict(manifest)
    if value is None:
        del changed[field]
    else:
        changed[field] = value
    (copy / MANIFEST).write_text(json.dumps(changed))
    with pytest.raises(ShardSetError, match=f"this code reads '{FORMAT}' version {FORMAT_VERSION}"):
        open_shard_set(copy)


def test_missing_incomplete_and_damaged_sets(shard_set, tmp_path):
    out, _ = shard_set
    with pytest.raises(ShardSetError, match="does not exist"):
        open_shard_set(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardSetError, match="incomplete: no manifest.json"):
        open_shard_set(tmp_path / "empty")
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / MANIFEST).write_text("{not json")
    with pytest.raises(ShardSetError, match="not valid JSON"):
        open_shard_set(copy)
    shutil.copy(out / MANIFEST, copy / MANIFEST)
    next((copy / "val").glob("*.idx")).unlink()
    with pytest.raises(ShardSetError, match="is missing"):
        open_shard_set(copy)
    with pytest.raises(ShardSetError, match="does not fit"):
        open_shard_set(out, input_size=299)


def test_reading_a_shard_set_loads_no_image_library(shard_set):
    """The reader and the numbers it builds (pipeline.transforms) are plain numpy: a process
    that only reads a manifest and stats.json imports neither OpenCV nor Pillow nor libjpeg."""
    code = (
        "import sys; from pipeline.shardset import open_shard_set; "
        f"s = open_shard_set({str(shard_set[0])!r}); s.normalization(True); "
        "print([m for m in ('cv2', 'PIL', 'simplejpeg', 'pipeline.preprocess') if m in sys.modules])"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
