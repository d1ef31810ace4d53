"""`python -m pipeline.shard` onto a filesystem that fills up: one clear line naming the file
and the room left (exit status 4), never a traceback; nothing half-written is kept or counted
(no temporary file, no manifest); after space is freed the same command resumes, keeping the
shards it finished, and ends byte-identical to a run that never ran out."""

from __future__ import annotations

import subprocess
import sys

from pipeline.atomic import EXIT_OUT_OF_SPACE
from tests.helpers import REPO, SHARD_SIZE, grow, small_disk, tree_bytes


def test_sharding_onto_a_full_disk_says_so_and_resumes_once_there_is_room(sample_root, shard_set, tmp_path):
    with small_disk(tmp_path / "disk", "1500k") as disk:
        out = disk / "shards"
        cmd = [sys.executable, "-m", "pipeline.shard", "--src", str(sample_root), "--out", str(out),
               "--shard-size", str(SHARD_SIZE), "--workers", "1", "--quiet"]  # fmt: skip
        full = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert full.returncode == EXIT_OUT_OF_SPACE, full.stderr[-3000:]
        errors = [line for line in full.stderr.splitlines() if " ERROR " in line]
        assert len(errors) == 1 and "Traceback" not in full.stderr, full.stderr[-3000:]
        assert f"out of space writing {out}/" in errors[0] and " free there" in errors[0]
        assert "running the same command again" in errors[0]
        assert not (out / "manifest.json").exists()
        assert not [p for p in out.rglob("*") if ".tmp" in p.name], "a temporary file was left behind"
        kept = sorted(p.name for p in (out / ".state").rglob("*.json"))
        assert kept, "no shard was finished before the disk filled: make the disk bigger"

        grow(disk, "64m")
        again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
        assert f"({len(kept)} shard(s) already complete and kept)" in again.stderr
        assert tree_bytes(out) == tree_bytes(shard_set[0])  # as if it had never run out
