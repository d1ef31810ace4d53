"""`pipeline.shard` end to end on the sample data: contract 1 as written on disk."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.shard import run
from pipeline.wds import ShardTarWriter
from tests.helpers import REPO, SHARD_SIZE, read_tar, shard_config, tree_bytes


def test_manifest_counts_and_checksums_match_the_files(shard_set, sample_root):
    out, manifest = shard_set
    assert json.loads((out / "manifest.json").read_text()) == manifest
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    # 300 train files, 3 broken on purpose; 100 val files, 1 broken.
    assert (train["num_samples"], train["num_skipped"]) == (297, 3)
    assert (val["num_samples"], val["num_skipped"]) == (99, 1)
    assert train["num_shards"] == 5 and val["num_shards"] == 2
    for split in (train, val):
        assert sum(s["num_samples"] for s in split["shards"]) == split["num_samples"]
        for shard in split["shards"]:
            data = (out / shard["tar"]).read_bytes()
            assert len(data) == shard["bytes"]
            assert hashlib.sha256(data).hexdigest() == shard["sha256"]
            assert sum(name.endswith(".jpg") for name, _ in read_tar(out / shard["tar"])) == shard["num_samples"]
            assert (out / shard["idx"]).is_file()
    assert [c["wnid"] for c in manifest["classes"]] == sorted(c["wnid"] for c in manifest["classes"])
    assert manifest["image_size"] == 256 and manifest["jpeg_quality"] == 90
    assert manifest["source"]["layouts"] == {"train": "folders", "val": "folders"}


def test_broken_files_are_skipped_with_their_reasons(shard_set):
    _, manifest = shard_set
    skipped = {
        s["path"].rsplit("/", 1)[-1]: s["reason"] for split in manifest["splits"].values() for s in split["skipped"]
    }
    assert "truncated" in skipped["n01440764_2.JPEG"]
    assert skipped["n02102040_2.JPEG"] == "empty file"
    assert "not an image" in skipped["n02979186_2.JPEG"]
    assert "truncated" in skipped["ILSVRC2012_val_00000001.JPEG"]


def test_samples_are_256_jpegs_with_labels_and_metadata(shard_set):
    out, manifest = shard_set
    wnid_of = {c["index"]: c["wnid"] for c in manifest["classes"]}
    members = read_tar(out / manifest["splits"]["train"]["shards"][0]["tar"])
    by_key: dict[str, dict[str, bytes]] = {}
    for name, data in members:
        key, ext = name.split(".", 1)
        assert "." not in key and len(key) <= 100
        by_key.setdefault(key, {})[ext] = data
    assert len(by_key) == SHARD_SIZE - 1 or len(by_key) == SHARD_SIZE
    for key, sample in by_key.items():
        assert set(sample) == {"jpg", "cls", "json"}
        img = Image.open(io.BytesIO(sample["jpg"]))
        assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (256, 256))
        meta = json.loads(sample["json"])
        assert meta["wnid"] == wnid_of[int(sample["cls"].decode("ascii"))]
        assert meta["src"].endswith(f"/{meta['wnid']}/{key}.JPEG")


def test_train_is_globally_shuffled_val_is_not(shard_set):
    out, manifest = shard_set
    first = [
        json.loads(d)["wnid"]
        for n, d in read_tar(out / manifest["splits"]["train"]["shards"][0]["tar"])
        if n.endswith(".json")
    ]
    assert len(set(first)) >= 8  # a mix of classes in one shard, not one class after another
    val_src = [
        json.loads(d)["src"]
        for n, d in read_tar(out / manifest["splits"]["val"]["shards"][0]["tar"])
        if n.endswith(".json")
    ]
    assert val_src == sorted(val_src)


def test_stats_are_the_moments_of_the_training_pixels(shard_set):
    out, manifest = shard_set
    stats = json.loads((out / "stats.json").read_text())
    assert stats["num_images"] == 297 and stats["num_pixels"] == 297 * 64 * 64  # the 4x4 grid (pipeline.stats)
    # Recompute from the shards themselves (decoded JPEG: close, not exact).
    pixels = []
    for shard in manifest["splits"]["train"]["shards"]:
        for name, data in read_tar(out / shard["tar"]):
            if name.endswith(".jpg"):
                pixels.append(np.asarray(Image.open(io.BytesIO(data))).reshape(-1, 3)[::7])
    allpx = np.concatenate(pixels).astype(np.float64)
    assert np.allclose(stats["mean"], allpx.mean(0), atol=1.0)
    assert np.allclose(stats["covariance"], np.cov(allpx.T, bias=True), rtol=0.05, atol=20)
    vals, vecs = np.array(stats["eigenvalues"]), np.array(stats["eigenvectors"])
    cov = np.array(stats["covariance"])
    assert list(vals) == sorted(vals, reverse=True) and (vals > 0).all()
    assert np.allclose(vecs @ vecs.T, np.eye(3), atol=1e-8)
    for k in range(3):  # each row is an eigenvector of the covariance
        assert np.allclose(cov @ vecs[k], vals[k] * vecs[k], rtol=1e-6, atol=1e-6)
    assert np.allclose(stats["std"], np.sqrt(np.diag(cov)))


def index_with_dali(tar_path: Path, idx_path: Path) -> None:
    """The independent oracle: index `tar_path` with DALI's own wds2idx (installed with DALI)."""
    from wds2idx import IndexCreator

    with IndexCreator(str(tar_path), str(idx_path), verbose=False) as creator:
        creator.create_index()


def test_idx_files_are_dali_wds2idx_output_byte_for_byte(shard_set, tmp_path):
    pytest.importorskip("wds2idx", reason="DALI not installed")
    out, manifest = shard_set
    shard = manifest["splits"]["val"]["shards"][0]
    index_with_dali(out / shard["tar"], tmp_path / "x.idx")
    assert (tmp_path / "x.idx").read_bytes() == (out / shard["idx"]).read_bytes()
    # ...and the shard writer, rewriting the tar from its members, gives the same bytes and index.
    w = ShardTarWriter(tmp_path / "copy.tar")
    members = read_tar(out / shard["tar"])
    for i in range(0, len(members), 3):
        w.add(members[i][0].split(".")[0], {n.split(".", 1)[1]: d for n, d in members[i : i + 3]})
    w.close()
    assert (tmp_path / "copy.tar").read_bytes() == (out / shard["tar"]).read_bytes()
    assert w.index_text() == (out / shard["idx"]).read_text()


def test_read_back_with_webdataset(shard_set):
    wds = pytest.importorskip("webdataset")
    out, manifest = shard_set
    urls = [str(out / s["tar"]) for s in manifest["splits"]["val"]["shards"]]
    seen = []
    for sample in wds.WebDataset(urls, shardshuffle=False).decode("rgb8").to_tuple("__key__", "jpg", "cls"):
        key, img, cls = sample
        assert img.shape == (256, 256, 3) and img.dtype == np.uint8
        seen.append((key, int(cls)))
    assert len(seen) == manifest["splits"]["val"]["num_samples"]
    truth = {c["wnid"]: c["index"] for c in manifest["classes"]}
    # labels agree with the folder each val file came from
    by_key = {}
    for shard in manifest["splits"]["val"]["shards"]:
        for name, data in read_tar(out / shard["tar"]):
            if name.endswith(".json"):
                by_key[name.split(".")[0]] = truth[json.loads(data)["src"].split("/")[1]]
    assert dict(seen) == by_key


def test_read_back_with_dali_on_cpu(shard_set):
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def

    out, manifest = shard_set
    shards = manifest["splits"]["train"]["shards"]

    @pipeline_def(batch_size=32, num_threads=2, device_id=None)
    def read():
        jpg, cls = fn.readers.webdataset(
            paths=[str(out / s["tar"]) for s in shards],
            index_paths=[str(out / s["idx"]) for s in shards],
            ext=["jpg", "cls"],
            missing_component_behavior="error",
            name="reader",
            pad_last_batch=True,
        )
        return fn.decoders.image(jpg, device="cpu"), cls

    pipe = read()
    pipe.build()
    n = pipe.epoch_size("reader")
    assert n == manifest["splits"]["train"]["num_samples"]
    labels = []
    while len(labels) < n:
        images, cls = pipe.run()
        for i in range(len(images)):
            assert np.array(images[i]).shape == (256, 256, 3)
            labels.append(int(bytes(np.array(cls[i])).decode("ascii")))
    labels = labels[:n]
    expected = []
    for shard in shards:
        expected += [int(d) for name, d in read_tar(out / shard["tar"]) if name.endswith(".cls")]
    assert labels == expected


def test_rerun_of_a_complete_set_changes_nothing(shard_set, sample_root):
    out, manifest = shard_set
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert run(shard_config(sample_root, out)) == manifest
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_one_worker_and_seed_change(sample_root, shard_set, tmp_path):
    out, _ = shard_set
    single = tmp_path / "single"
    run(shard_config(sample_root, single, workers=1))
    assert tree_bytes(single) == tree_bytes(out)  # same bytes, whatever the worker count
    # A new seed reshuffles train: the stale shards of the old plan are replaced, not mixed in.
    m2 = run(shard_config(sample_root, single, workers=1, seed=1))
    assert (
        m2["splits"]["train"]["shards"][0]["sha256"]
        != json.loads((out / "manifest.json").read_text())["splits"]["train"]["shards"][0]["sha256"]
    )
    assert sorted(p.name for p in (single / "train").glob("*.tar")) == sorted(
        Path(s["tar"]).name for s in m2["splits"]["train"]["shards"]
    )


def test_shard_mb_sizes_shards_by_bytes(sample_root, tmp_path):
    m = run(shard_config(sample_root, tmp_path / "mb", shard_mb=1.0, workers=2))
    sizes = [s["bytes"] for s in m["splits"]["train"]["shards"]]
    assert len(sizes) > 5
    assert all(0.7e6 < b < 1.3e6 for b in sizes[:-1])


def test_cli_help_and_clear_error_on_bad_src(tmp_path):
    help_ = subprocess.run([sys.executable, "-m", "pipeline.shard", "--help"], capture_output=True, text=True, cwd=REPO)
    assert help_.returncode == 0 and "--ray-address" in help_.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "pipeline.shard", "--src", str(tmp_path), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert bad.returncode == 2 and "no ImageNet layout found" in bad.stderr
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_limit_takes_the_first_n_files_of_each_split(sample_root, tmp_path):
    m = run(shard_config(sample_root, tmp_path / "smoke", limit=7, workers=1))
    assert m["limit"] == 7
    for split in ("train", "val"):
        info = m["splits"][split]
        assert info["num_samples"] + info["num_skipped"] == 7
    val_src = [
        json.loads(d)["src"]
        for s in m["splits"]["val"]["shards"]
        for n, d in read_tar(tmp_path / "smoke" / s["tar"])
        if n.endswith(".json")
    ]
    every_val = sorted(p.relative_to(sample_root).as_posix() for p in (sample_root / "val").rglob("*") if p.is_file())
    assert set(val_src) <= set(every_val[:7])
    help_ = subprocess.run([sys.executable, "-m", "pipeline.shard", "--help"], capture_output=True, text=True, cwd=REPO)
    assert "--limit" in help_.stdout and "RAY_ADDRESS" in help_.stdout
