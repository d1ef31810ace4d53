"""Every corruption kind (tests/corrupt_images.py, made from real files) is refused by the
one preprocessing function with its reason, and skipped and reported by the sharder: never
stored as an image, never a partial decode. The JPEG oddities: stray bytes that hold no
image data keep the image, pixels identical to the clean file, noted in the manifest;
damage that loses image data skips it."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import simplejpeg

from pipeline.preprocess import ImageError, prepare_image
from pipeline.shard import run
from tests.corrupt_images import catalogue, jpeg_oddities, photo
from tests.helpers import shard_config

CASES = catalogue()
ODDITIES = jpeg_oddities()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_each_corruption_kind_is_refused_with_its_reason(case):
    with pytest.raises(ImageError) as err:
        prepare_image(case.data)
    assert case.reason in err.value.reason
    assert err.value.kind == "invalid_image"


def test_the_intact_sources_are_accepted():
    for fmt in ("JPEG", "PNG", "GIF", "TIFF", "WEBP", "BMP"):
        assert prepare_image(photo(fmt)).pixels.shape == (256, 256, 3)


@pytest.mark.parametrize("odd", [o for o in ODDITIES if o.kept], ids=lambda o: o.name)
def test_stray_bytes_that_hold_no_image_data_keep_the_jpeg_whole_and_are_noted(odd):
    """The claim checked by decoding: the kept file's pixels are those of the clean file."""
    clean, kept = prepare_image(odd.clean), prepare_image(odd.data)
    assert np.array_equal(kept.pixels, clean.pixels)
    assert clean.notes == () and len(kept.notes) == 1 and odd.expect in kept.notes[0], kept.notes


@pytest.mark.parametrize("odd", [o for o in ODDITIES if not o.kept], ids=lambda o: o.name)
def test_damage_that_loses_image_data_skips_the_jpeg(odd):
    """Refused with libjpeg's reason; and the claim checked by decoding: the decode libjpeg
    makes when told to carry on past the warning is not the clean file's picture."""
    with pytest.raises(ImageError) as err:
        prepare_image(odd.data)
    assert odd.expect in err.value.reason and err.value.kind == "invalid_image"
    lenient = simplejpeg.decode_jpeg(odd.data, strict=False)
    assert not np.array_equal(lenient, simplejpeg.decode_jpeg(odd.clean))


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
    assert sorted(stored) == sorted(
        f"train/n00000002/hopper_{f}.img" for f in ("jpeg", "png", "gif", "tiff", "webp", "bmp")
    )


def test_sharder_keeps_and_notes_or_skips_each_jpeg_oddity(tmp_path):
    """Through the sharder: a kept file is stored with the clean file's very bytes (same
    pixels, same encoder) and listed under `notes`; a damaged one is under `skipped`."""
    src = tmp_path / "raw"
    cls = src / "train" / "n00000001"
    cls.mkdir(parents=True)
    for odd in ODDITIES:
        (cls / f"{odd.name}.JPEG").write_bytes(odd.data)
    (cls / "clean.JPEG").write_bytes(photo("JPEG"))
    manifest = run(shard_config(src, tmp_path / "out", workers=1))
    train = manifest["splits"]["train"]
    notes = {n["path"]: n["note"] for n in train["notes"]}
    skipped = {s["path"]: s["reason"] for s in train["skipped"]}
    kept = [o for o in ODDITIES if o.kept]
    assert train["num_samples"] == len(kept) + 1 and train["num_noted"] == len(kept) == len(notes)
    assert train["num_skipped"] == len(ODDITIES) - len(kept) == len(skipped)
    for odd in ODDITIES:
        path = f"train/n00000001/{odd.name}.JPEG"
        assert odd.expect in (notes if odd.kept else skipped)[path], (odd.name, notes, skipped)
    stored = {}
    for shard in train["shards"]:
        with tarfile.open(tmp_path / "out" / shard["tar"]) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        for name, data in members.items():
            if name.endswith(".json"):
                stored[json.loads(data)["src"]] = members[name[: -len("json")] + "jpg"]
    clean = stored.pop("train/n00000001/clean.JPEG")
    assert sorted(stored) == sorted(f"train/n00000001/{o.name}.JPEG" for o in ODDITIES if o.kept)
    base = [o.name for o in kept if o.clean == photo("JPEG")]
    assert base and all(stored[f"train/n00000001/{name}.JPEG"] == clean for name in base)
