"""What a resubmission is judged against (trainer.run.judge_changes; no Ray involved): the
newest checkpoint's own config, else config.json, else --resume's checkpoint; --fresh
ignores the run's own files but not --resume's."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from trainer import checkpoint as ck
from trainer.config import TrainConfig, config_changes, describe_changes
from trainer.run import TrainSetupError, judge_changes
from trainer.runfolder import CONFIG, RunFolder


def fake_checkpoint(folder, **train_config):
    """model.json (and a weights file to make it look complete): all the judge reads."""
    folder.mkdir(parents=True)
    (folder / ck.WEIGHTS).write_bytes(b"")
    (folder / ck.META).write_text(json.dumps({"format": ck.FORMAT, "format_version": ck.FORMAT_VERSION,
                                              "train_config": TrainConfig(**train_config).to_json()}))
    return folder


@pytest.fixture
def run(tmp_path):
    folder = tmp_path / "runs" / "r"
    fake_checkpoint(folder / "checkpoint_epoch_0002", lr=0.01)
    (folder / ck.POINTER).write_text(ck.pointer_json("checkpoint_epoch_0002", 2))
    (folder / CONFIG).write_text(json.dumps(TrainConfig(lr=0.5).to_json()))  # ahead of every checkpoint
    return RunFolder(str(tmp_path / "runs"), "r")


def test_a_resubmission_is_judged_against_what_the_newest_checkpoint_was_trained_with(run):
    cfg = TrainConfig(lr=0.01)
    assert judge_changes(run, cfg, allow_changes=False) == {}
    with pytest.raises(TrainSetupError, match=r"lr: 0.01 -> 0.5"):
        judge_changes(run, replace(cfg, lr=0.5), allow_changes=False)
    assert judge_changes(run, replace(cfg, lr=0.5), allow_changes=True) == {"lr": (0.01, 0.5)}


def test_fresh_ignores_the_run_but_not_the_checkpoint_it_resumes_from(run, tmp_path):
    assert judge_changes(run, TrainConfig(lr=0.3), allow_changes=False, fresh=True) == {}
    other = fake_checkpoint(tmp_path / "other" / "checkpoint_epoch_0007", lr=0.02)
    cfg = TrainConfig(lr=0.3, resume_from=str(other))
    with pytest.raises(TrainSetupError, match=r"checkpoint .*lr: 0.02 -> 0.3"):
        judge_changes(run, cfg, allow_changes=False, fresh=True)


def test_a_change_is_listed_field_by_field_in_one_wording():
    """The wording the refusal and the --allow-changes warning share; fields free to change
    (epochs) and the run's identity (name) are not changes."""
    stored = TrainConfig(lr=0.01, batch_size=128, epochs=5, name="a").to_json()
    changes = config_changes(stored, TrainConfig(lr=0.02, batch_size=256, epochs=9, name="b"))
    assert changes == {"batch_size": (128, 256), "lr": (0.01, 0.02)}
    assert describe_changes(changes) == "batch_size: 128 -> 256; lr: 0.01 -> 0.02"
