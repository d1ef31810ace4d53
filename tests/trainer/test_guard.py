"""The divergence guard's rule and rank 0's progress lines, as plain objects."""

from __future__ import annotations

import logging
import math

import torch

from trainer.guard import FACTOR, PATIENCE, DivergenceGuard
from trainer.progress import Progress


def test_guard_trips_on_a_non_finite_loss_at_once():
    guard = DivergenceGuard()
    assert guard.set_reference(2.3) is None
    assert "nan" in guard.check(math.nan)
    assert "inf" in guard.check(math.inf)
    assert "first step" in DivergenceGuard().set_reference(math.nan)


def test_guard_trips_only_on_a_sustained_blow_up():
    guard = DivergenceGuard()
    guard.set_reference(2.0)
    assert PATIENCE == 2 and FACTOR == 3.0
    assert guard.check(6.5) is None  # once above 3x: a spike
    assert guard.check(5.9) is None  # back below: the count starts over
    assert guard.check(6.1) is None
    reason = guard.check(30.0)  # twice in a row
    assert reason and "above 3x its starting value 2" in reason
    restored = DivergenceGuard()
    restored.load_state_dict(guard.state_dict())  # it travels in the resume state
    assert restored == guard


class Loader:
    wait_s = 0.0


def test_progress_every_print_freq_steps_and_at_least_every_interval(caplog):
    log = logging.getLogger("test.progress")
    loader = Loader()
    with caplog.at_level(logging.INFO, logger="test.progress"):
        p = Progress(log, epoch=1, epochs=90, steps=10, world=4, print_freq=4, loader=loader)
        for step in range(10):
            loader.wait_s += 0.001
            p.update(step, torch.tensor(2.5), 32, 0.01)
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(" | ")[0] for line in lines] == ["epoch 2/90 step 4/10", "epoch 2/90 step 8/10"]
    assert "img/s | data wait" in lines[0] and "loss 2.5000 | lr 0.01 | ETA epoch 0:00:00, run 0:00:" in lines[0]
    # (the run's ETA is the rest of 90 epochs at this loop's pace: a second or two on a busy machine)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="test.progress"):
        p = Progress(log, epoch=0, epochs=1, steps=5, world=1, print_freq=0, loader=loader, max_interval_s=0.0)
        for step in range(5):
            p.update(step, torch.tensor(1.0), 8, 0.01)
    assert len(caplog.records) == 4  # time's up at every step; the epoch's own line covers the last
