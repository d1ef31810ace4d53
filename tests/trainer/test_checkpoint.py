"""Contract 2 (trainer/checkpoint.py): the typed metadata (round trip, version refusal, the
model.json runs wrote before it was typed), weights into a model, the pointer to the newest
checkpoint, light imports. The resume state it also holds: test_resume.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.transforms import Normalization
from tests.helpers import REPO
from trainer import checkpoint as ck
from trainer import checkpoint_meta as ckm
from trainer.model import AlexNet, AlexNetConfig

CLASSES = [{"index": i, "wnid": f"n{i:08d}", "name": f"c{i}"} for i in range(10)]
LEGACY = Path(__file__).parent / "legacy"


def small_model() -> AlexNet:
    torch.manual_seed(0)
    return AlexNet(AlexNetConfig(num_classes=10, input_size=67, init="kaiming"))


def test_the_saved_checkpoint_reloads_with_identical_outputs(tmp_path):
    model = small_model().eval()
    ck.save(
        tmp_path / "ck",
        model,
        classes=CLASSES,
        normalization=Normalization((1.0, 2.0, 3.0)),
        epoch=4,
        metrics={"val_top1_error": 0.5},
        shards=ckm.ShardsMeta(jpeg_quality=90),
        run="r",
        train_config={"recipe": {"lr": 0.01}},
    )
    loaded, meta = ck.load_model(tmp_path / "ck")
    x = torch.randn(3, 3, 67, 67) * 50
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert meta.epoch == 4 and meta.classes == CLASSES and meta.normalization == Normalization((1.0, 2.0, 3.0))
    assert meta.architecture == model.cfg and meta.input_size == 67 and meta.wnids == [c["wnid"] for c in CLASSES]
    assert meta.jpeg_quality == 90 and meta.run == "r" and meta.train_config == {"recipe": {"lr": 0.01}}
    # the weights go into a model one already has, in place, and the metadata comes back
    other = small_model()
    torch.nn.init.zeros_(other.columns[0].conv1.weight)
    assert ck.load_weights(tmp_path / "ck", other) == meta
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), model.state_dict().values()))
    with pytest.raises(ckm.CheckpointError, match="does not match"):
        ck.load_weights(tmp_path / "ck", AlexNet(AlexNetConfig(num_classes=10, input_size=67, columns=1)))


def test_checkpoint_meta_round_trips_through_model_json(tmp_path):
    meta = ckm.CheckpointMeta(
        architecture=AlexNetConfig(num_classes=10, input_size=99, lrn=False),
        classes=CLASSES,
        normalization=Normalization((1.0, 2.0, 3.0), (4.0, 5.0, 6.0)),
        epoch=7,
        metrics={"val_top1_error": 0.25},
        shards=ckm.ShardsMeta("/s", 256, 85, "f" * 64),
        run="r",
        train_config={"recipe": {"name": "sample"}},
    )
    doc = json.loads(json.dumps(meta.to_json()))
    assert ckm.CheckpointMeta.from_json(doc) == meta
    assert doc["format"] == ckm.FORMAT and doc["format_version"] == ckm.FORMAT_VERSION and doc["input_size"] == 99
    assert ckm.CheckpointMeta.from_json({**doc, "shards": None}).jpeg_quality is None


@pytest.mark.parametrize(
    "change,error",
    [
        ({"format_version": ckm.FORMAT_VERSION + 1}, "written by a newer version"),
        ({"format": "someone/else"}, "is not an alexnet-2012/checkpoint file"),
        ({"classes": CLASSES[:3]}, "3 classes listed for a 10-way model"),
        ({"architecture": {"num_classes": 10, "columns": 3}}, "bad architecture"),
        ({"normalization": {"mean": [1, 2, 3]}}, "bad metadata"),
    ],
)
def test_checkpoint_meta_refuses_what_this_version_cannot_read(change, error):
    doc = ckm.CheckpointMeta(
        architecture=AlexNetConfig(num_classes=10), classes=CLASSES, normalization=Normalization((0.0, 0.0, 0.0))
    ).to_json()
    with pytest.raises(ckm.CheckpointError, match=error):
        ckm.CheckpointMeta.from_json({**doc, **change})


def test_model_json_written_before_the_metadata_was_typed_still_loads():
    """tests/trainer/legacy/model.json: what the trainer wrote before CheckpointMeta existed
    (its train_config in the flat form config.json had then)."""
    doc = json.loads((LEGACY / "model.json").read_text())
    meta = ckm.CheckpointMeta.from_json(doc)
    assert meta.architecture == AlexNetConfig(num_classes=10, input_size=67, init="kaiming")
    assert meta.epoch == 2 and meta.run == "stopped" and meta.jpeg_quality == 90 and len(meta.classes) == 10
    assert meta.normalization == Normalization((118.5, 112.25, 100.0), (60.5, 58.0, 61.25))
    assert meta.shards == ckm.ShardsMeta("/data/shards", 256, 90, "0" * 64)
    assert meta.train_config == json.loads((LEGACY / "config.json").read_text())
    assert meta.to_json() == doc  # written again, the same document


def write_checkpoint(run, name: str, epoch: int):
    ck.save(
        run / name,
        small_model(),
        classes=CLASSES,
        normalization=Normalization((0.0, 0.0, 0.0)),
        epoch=epoch,
        metrics={},
    )


def test_latest_checkpoint_follows_the_pointer_only(tmp_path):
    for epoch in (1, 2, 3):
        write_checkpoint(tmp_path, ck.checkpoint_dir_name(epoch), epoch)
    assert ck.latest_checkpoint(tmp_path) is None  # nothing pointed at yet: nothing trusted
    (tmp_path / ck.POINTER).write_text(ck.pointer_json("checkpoint_epoch_0002", 2))
    assert ck.latest_checkpoint(tmp_path) == tmp_path / "checkpoint_epoch_0002"  # 3 exists, not pointed at
    assert ck.epoch_of(ck.latest_checkpoint(tmp_path)) == 2 and ck.epoch_of(tmp_path / "checkpoint_x") is None
    assert ck.resolve(tmp_path) == ck.Resolved(tmp_path / "checkpoint_epoch_0002", run_dir=tmp_path)
    assert ck.resolve(tmp_path / "checkpoint_epoch_0003") == ck.Resolved(tmp_path / "checkpoint_epoch_0003", None)
    (tmp_path / ck.POINTER).write_text(ck.pointer_json("checkpoint_epoch_0009", 9))  # gone (retention)
    assert ck.latest_checkpoint(tmp_path) is None
    (tmp_path / ck.POINTER).write_text(json.dumps({"checkpoint": "../elsewhere"}))
    assert ck.latest_checkpoint(tmp_path) is None
    with pytest.raises(ckm.CheckpointError, match="neither a checkpoint"):
        ck.resolve(tmp_path)


def test_a_folder_of_run_folders_resolves_to_the_run_that_wrote_a_checkpoint_last(tmp_path):
    """The storage path ($ALEXNET_HOME/runs): `python -m serving` with no checkpoint given."""
    for run, epoch, when in (("a", 3, 2_000_000_000), ("b", 1, 2_000_000_100), ("c", 2, 2_000_000_050)):
        write_checkpoint(tmp_path / run, ck.checkpoint_dir_name(epoch), epoch)
        (tmp_path / run / ck.POINTER).write_text(ck.pointer_json(ck.checkpoint_dir_name(epoch), epoch))
        os.utime(tmp_path / run / ck.POINTER, (when, when))
    (tmp_path / "d").mkdir()  # a run with no checkpoint yet, and a stray file: passed over
    (tmp_path / "notes.txt").write_text("x")
    assert ck.resolve(tmp_path) == ck.Resolved(tmp_path / "b" / "checkpoint_epoch_0001", run_dir=tmp_path / "b")
    os.utime(tmp_path / "a" / ck.POINTER, (2_000_000_200, 2_000_000_200))  # a writes a newer one
    assert ck.resolve(tmp_path) == ck.Resolved(tmp_path / "a" / "checkpoint_epoch_0003", run_dir=tmp_path / "a")
    assert ck.resolve(tmp_path / "c").checkpoint == tmp_path / "c" / "checkpoint_epoch_0002"  # a run folder as before
    with pytest.raises(ck.CheckpointError, match="nor a folder of run folders with one"):
        ck.resolve(tmp_path / "d")


def test_the_pointer_is_parsed_in_one_place_and_anything_odd_is_no_pointer():
    assert ck.parse_pointer(ck.pointer_json("checkpoint_epoch_0007", 7)) == {
        "checkpoint": "checkpoint_epoch_0007",
        "epoch": 7,
    }
    good = {"format": ck.POINTER_FORMAT, "checkpoint": "checkpoint_epoch_0001", "epoch": 1}
    for text in (
        None,
        "",
        "{",
        "[]",
        json.dumps({**good, "format": "x"}),
        json.dumps({**good, "epoch": "one"}),
        json.dumps({k: v for k, v in good.items() if k != "epoch"}),
        json.dumps({**good, "checkpoint": "../checkpoint_epoch_0001"}),
        json.dumps({**good, "checkpoint": "checkpoint_epoch_0001/../../x"}),
        json.dumps({**good, "checkpoint": "model"}),
    ):
        assert ck.parse_pointer(text) is None, text


def test_the_checkpoint_module_imports_nothing_heavy():
    """Serving imports it: no Ray, pyarrow, DALI or matplotlib behind it."""
    code = (
        "import sys, trainer.checkpoint; "
        "print([m for m in ('ray', 'pyarrow', 'nvidia.dali', 'matplotlib') if m in sys.modules])"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
