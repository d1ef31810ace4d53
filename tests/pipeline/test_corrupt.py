"""Every corruption kind (tests/corrupt_images.py, made from real files) is refused by the
one preprocessing function with its reason, and skipped and reported by the sharder: never
stored as an image, never a partial decode."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest

from pipeline.preprocess import ImageError, prepare_image
from pipeline.shard import run
from tests.helpers import shard_config
from tests.corrupt_images import catalogue, photo

CASES = catalogue()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_each_corruption_kind_is_refused_with_its_reason(case):
    with pytest.raises(ImageError) as err:
        prepare_image(case.data)
    assert case.reason in err.value.reason
    assert err.value.kind == "invalid_image"


def test_the_intact_sources_are_accepted():
    for fmt in ("JPEG", "PNG", "GIF", "TIFF", "WEBP", "BMP"):
        assert prepare_image(photo(fmt)).pixels.shape == (256, 256, 3)


def test_junk_between_the_last_scan_and_the_end_marker_keeps_the_jpeg_whole():
    """The one libjpeg warning that loses no pixel (some ImageNet files have it)."""
    good = photo("JPEG")
    assert good.endswith(b"\xff\xd9")
    padded = good[:-2] + bytes(range(1, 200)) + b"\xff\xd9"
    assert np.array_equal(prepare_image(padded).pixels, prepare_image(good).pixels)


def test_a_failed_decode_is_never_retried_into_a_partial_image():
    """The PNG whose stream is damaged (CRCs intact) fails the same way every time: no
    second load() quietly returns the half-decoded pixels."""
    broken = next(c for c in CASES if c.name == "png-damaged-stream-valid-crcs@middle")
    for _ in range(2):
        with pytest.raises(ImageError, match="broken data stream"):
            prepare_image(broken.data)


def test_sharder_skips_and_reports_every_corrupt_file(tmp_path):
    src = tmp_path / "raw"
    bad, good = src / "train" / "n00000001", src / "train" / "n00000002"
    bad.mkdir(parents=True)
    good.mkdir(parents=True)
    for case in CASES:
        (bad / f"{case.name.replace('@', '_at_')}{case.suffix}").write_bytes(case.data)
    for fmt in ("JPEG", "PNG", "GIF", "TIFF", "WEBP", "BMP"):
        (good / f"hopper_{fmt.lower()}.img").write_bytes(photo(fmt))
    manifest = run(shard_config(src, tmp_path / "out", workers=1))
    train = manifest["splits"]["train"]
    skipped = {s["path"]: s["reason"] for s in train["skipped"]}
    assert train["num_samples"] == 6 and train["num_skipped"] == len(CASES)
    for case in CASES:
        reason = skipped[f"train/n00000001/{case.name.replace('@', '_at_')}{case.suffix}"]
        assert case.reason in reason, (case.name, reason)
    stored = []
    for shard in train["shards"]:
        with tarfile.open(tmp_path / "out" / shard["tar"]) as tar:
            stored += [json.load(io.BytesIO(tar.extractfile(m).read()))["src"] for m in tar if m.name.endswith(".json")]
    assert sorted(stored) == sorted(f"train/n00000002/hopper_{f}.img" for f in ("jpeg", "png", "gif", "tiff", "webp", "bmp"))
