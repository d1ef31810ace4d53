"""trainer/board.py without Ray: rank 0's event files read back with TensorBoard's own event
reader: every epoch scalar at its epoch, the progress lines' scalars at their train steps (a
run of their own), the end-of-run images; a resumed run hides what the dead run wrote past its
checkpoint, so each epoch shows once. (A real Ray Train run's files: tests/trainer/test_run.py.)"""

from __future__ import annotations

import pytest

from trainer.board import CONV1_KERNELS, EPOCH_SCALARS, LEARNING_CURVES, STEP_LOSS, STEPS_DIR, Board
from trainer.model import AlexNet, AlexNetConfig

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def read(folder) -> event_accumulator.EventAccumulator:
    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def row(epoch: int, loss: float) -> dict:
    return {
        "epoch": epoch,
        "lr": 0.01,
        "train_loss": loss,
        "train_top1_error": 0.9,
        "train_top5_error": 0.5,
        "val_loss": loss + 0.1,
        "val_top1_error": 0.8,
        "val_top5_error": 0.4,
        "images_per_s": 100.0,
        "data_wait_share": 0.1,
        "epoch_seconds": 3.0,  # not a TensorBoard scalar
    }


def test_a_resumed_run_shows_each_epoch_and_step_once_with_the_newer_values(tmp_path):
    steps = 10
    first = Board.open(str(tmp_path))
    for epoch in (1, 2, 3):  # the dead run got through epoch 3, but its last checkpoint is epoch 2's
        first.step((epoch - 1) * steps + 5, 10.0 * epoch, 50.0)
        first.epoch(row(epoch, 10.0 * epoch))
    first.close()
    again = Board.open(str(tmp_path), resumed_epoch=2, steps_per_epoch=steps)
    rows = [row(1, 10.0), row(2, 20.0)]
    for epoch in (3, 4):
        again.step((epoch - 1) * steps + 5, 1.0 * epoch, 60.0)
        again.epoch(row(epoch, 1.0 * epoch))
        rows.append(row(epoch, 1.0 * epoch))
    again.finish(AlexNet(AlexNetConfig(num_classes=10, input_size=67)), rows)
    again.close()

    epochs = read(tmp_path)
    assert sorted(epochs.Tags()["scalars"]) == sorted(EPOCH_SCALARS[k] for k in rows[0] if k in EPOCH_SCALARS)
    for key, tag in EPOCH_SCALARS.items():
        if key in rows[0]:
            points = epochs.Scalars(tag)
            assert [p.step for p in points] == [1, 2, 3, 4], tag
            assert [p.value for p in points] == pytest.approx([r[key] for r in rows]), tag
    assert sorted(epochs.Tags()["images"]) == sorted([CONV1_KERNELS, LEARNING_CURVES])
    (kernels,) = epochs.Images(CONV1_KERNELS)
    assert kernels.step == 4 and kernels.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"
    progress = read(tmp_path / STEPS_DIR).Scalars(STEP_LOSS)
    assert [(p.step, p.value) for p in progress] == [(5, 10.0), (15, 20.0), (25, 3.0), (35, 4.0)]


def test_no_progress_lines_no_steps_run(tmp_path):
    board = Board.open(str(tmp_path))
    board.epoch(row(1, 2.0))
    board.close()
    assert not (tmp_path / STEPS_DIR).exists() and [p.step for p in read(tmp_path).Scalars("train/loss")] == [1]


def test_event_files_that_cannot_be_written_never_stop_the_run(tmp_path, caplog):
    (tmp_path / "a-file").write_text("not a folder")
    assert Board.open(str(tmp_path / "a-file" / "run")) is None
    assert "no TensorBoard event files for this run" in caplog.text
    board = Board.open(str(tmp_path / "run"))
    board.epochs.close()  # the writer gone under it (a full disk, a lost mount): the next write fails
    board.epochs.add_scalar = None  # type: ignore[method-assign]
    board.epoch(row(1, 2.0))  # logged, not raised
    board.step(1, 1.0, 1.0)
    assert board.broken and "TensorBoard event files stop here" in caplog.text
