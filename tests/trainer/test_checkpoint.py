"""Contract 2 (trainer/checkpoint.py) and the per-rank random streams it holds (trainer/seeds.py;
the seed function: test_seeds.py): round trips, weights-only resume state, the pointer to the
newest checkpoint, light imports."""

from __future__ import annotations

import json
import pickle
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline.transforms import Normalization
from tests.helpers import REPO
from trainer import checkpoint as ck
from trainer.config import TrainConfig
from trainer.loop import State, new_state, rank_state_payload, train_state_payload
from trainer.model import AlexNet, AlexNetConfig
from trainer.seeds import capture_rng, restore_rng, seed_rank

CLASSES = [{"index": i, "wnid": f"n{i:08d}", "name": f"c{i}"} for i in range(10)]
CPU = [torch.device("cpu")]


def small_model() -> AlexNet:
    torch.manual_seed(0)
    return AlexNet(AlexNetConfig(num_classes=10, input_size=67, init="kaiming"))


def trained_state() -> State:
    """A state with real optimizer momentum and a schedule that has seen two epochs."""
    state = new_state(TrainConfig(), small_model())
    x, y = torch.randn(4, 3, 67, 67) * 50, torch.arange(4)
    torch.nn.functional.cross_entropy(state.model(x), y).backward()
    state.optimizer.step()
    state.scheduler.step(0.5)
    state.scheduler.step(0.6)
    state.epoch, state.lr_drops = 2, 0
    state.guard.set_reference(2.3)
    return state


def test_the_saved_checkpoint_reloads_with_identical_outputs(tmp_path):
    model = small_model().eval()
    ck.save(tmp_path / "ck", model, classes=CLASSES, normalization=Normalization((1.0, 2.0, 3.0)), epoch=4,
            metrics={"val_top1_error": 0.5}, shards={"jpeg_quality": 90}, run="r", train_config={"lr": 0.01})
    loaded, meta = ck.load_model(tmp_path / "ck")
    x = torch.randn(3, 3, 67, 67) * 50
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert meta["epoch"] == 4 and meta["classes"] == CLASSES and meta["normalization"]["mean"] == [1.0, 2.0, 3.0]
    assert meta["architecture"]["num_classes"] == 10 and meta["input_size"] == 67
    assert meta["shards"] == {"jpeg_quality": 90} and meta["run"] == "r" and meta["train_config"] == {"lr": 0.01}


def test_resume_state_loads_weights_only_and_round_trips(tmp_path):
    state = trained_state()
    seed_rank(7, rank=1)
    rng = capture_rng(CPU)
    ck.save(tmp_path, state.model, classes=CLASSES, normalization=Normalization((0.0, 0.0, 0.0)), epoch=2,
            metrics={}, train_state=train_state_payload(state, TrainConfig(), world=2))
    ck.save_rank_state(tmp_path, 1, rank_state_payload(state, 1, CPU))
    # Both files are plain torch.load(weights_only=True) material: no code runs on loading.
    shared = torch.load(tmp_path / ck.TRAIN_STATE, weights_only=True)
    own = torch.load(tmp_path / "rank_state_1.pt", weights_only=True)
    again = new_state(TrainConfig(), small_model())
    again.optimizer.load_state_dict(shared["optimizer"])
    again.scheduler.load_state_dict(shared["scheduler"])
    for p, q in zip(state.optimizer.state.values(), again.optimizer.state.values()):
        assert torch.equal(p["velocity"], q["velocity"])
    assert again.scheduler.state_dict() == state.scheduler.state_dict()
    assert shared["epoch"] == 2 and shared["guard"] == {"reference": 2.3, "bad_checks": 0}
    assert shared["config"] == TrainConfig().to_json() and own["rank"] == 1
    assert ck.load_rank_state(tmp_path, 0) is None  # no state for a rank that was not there
    for key in ("torch", "python", "numpy"):
        assert str(own["rng"][key]) == str(rng[key])


class Boom:
    def __reduce__(self):
        return (print, ("this ran",))


def test_a_resume_state_that_needs_unpickling_is_refused(tmp_path):
    (tmp_path / ck.TRAIN_STATE).write_bytes(b"")
    torch.save({"epoch": 1, "evil": Boom()}, tmp_path / ck.TRAIN_STATE)
    with pytest.raises(ck.CheckpointError, match="without unpickling code: .*Unsupported global"):
        ck.load_train_state(tmp_path)
    (tmp_path / "rank_state_0.pt").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(ck.CheckpointError):
        ck.load_rank_state(tmp_path, 0)


def test_rank_streams_differ_and_restore_exactly():
    seed_rank(0, rank=0)
    a = torch.rand(5), np.random.rand(), random.random()
    seed_rank(0, rank=1)
    b = torch.rand(5), np.random.rand(), random.random()
    assert not torch.equal(a[0], b[0]) and a[1] != b[1] and a[2] != b[2]
    state = capture_rng(CPU)
    want = torch.rand(5), np.random.rand(), random.random(), np.random.randn()
    torch.rand(100), np.random.rand(100), random.random()  # move on
    restore_rng(state, CPU)
    got = torch.rand(5), np.random.rand(), random.random(), np.random.randn()
    assert torch.equal(want[0], got[0]) and want[1:] == got[1:]


def write_checkpoint(run, name: str, epoch: int):
    ck.save(run / name, small_model(), classes=CLASSES, normalization=Normalization((0.0, 0.0, 0.0)), epoch=epoch,
            metrics={})


def test_latest_checkpoint_follows_the_pointer_only(tmp_path):
    for epoch in (1, 2, 3):
        write_checkpoint(tmp_path, ck.checkpoint_dir_name(epoch), epoch)
    assert ck.latest_checkpoint(tmp_path) is None  # nothing pointed at yet: nothing trusted
    (tmp_path / ck.POINTER).write_text(ck.pointer_json("checkpoint_epoch_0002", 2))
    assert ck.latest_checkpoint(tmp_path) == tmp_path / "checkpoint_epoch_0002"  # 3 exists, not pointed at
    assert ck.epoch_of(ck.latest_checkpoint(tmp_path)) == 2 and ck.epoch_of(tmp_path / "checkpoint_x") is None
    assert ck.resolve(tmp_path) == tmp_path / "checkpoint_epoch_0002"
    assert ck.resolve(tmp_path / "checkpoint_epoch_0003") == tmp_path / "checkpoint_epoch_0003"
    (tmp_path / ck.POINTER).write_text(ck.pointer_json("checkpoint_epoch_0009", 9))  # gone (retention)
    assert ck.latest_checkpoint(tmp_path) is None
    (tmp_path / ck.POINTER).write_text(json.dumps({"checkpoint": "../elsewhere"}))
    assert ck.latest_checkpoint(tmp_path) is None
    with pytest.raises(ck.CheckpointError, match="neither a checkpoint"):
        ck.resolve(tmp_path)


def test_the_pointer_is_parsed_in_one_place_and_anything_odd_is_no_pointer():
    assert ck.parse_pointer(ck.pointer_json("checkpoint_epoch_0007", 7)) == {"checkpoint": "checkpoint_epoch_0007",
                                                                             "epoch": 7}
    good = {"format": ck.POINTER_FORMAT, "checkpoint": "checkpoint_epoch_0001", "epoch": 1}
    for text in (None, "", "{", "[]", json.dumps({**good, "format": "x"}), json.dumps({**good, "epoch": "one"}),
                 json.dumps({k: v for k, v in good.items() if k != "epoch"}),
                 json.dumps({**good, "checkpoint": "../checkpoint_epoch_0001"}),
                 json.dumps({**good, "checkpoint": "checkpoint_epoch_0001/../../x"}),
                 json.dumps({**good, "checkpoint": "model"})):
        assert ck.parse_pointer(text) is None, text


def test_the_checkpoint_module_imports_nothing_heavy():
    """Serving imports it: no Ray, pyarrow, DALI or matplotlib behind it."""
    code = ("import sys, trainer.checkpoint; "
            "print([m for m in ('ray', 'pyarrow', 'nvidia.dali', 'matplotlib') if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
