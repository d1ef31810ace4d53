"""The paper's figures from a run folder.

    python -m trainer.figures RUN_DIR [--shards SHARDS]

- learning_curves.png: train/val top-1 and top-5 error and the learning rate per epoch;
- conv1_kernels.png: the 96 learned 11x11x3 conv1 kernels as an 8x12 tile, column A's 48
  on the left half and column B's 48 on the right (paper Figure 3);
- retrieval.png (with --shards): validation query images, each followed by the 6 training
  images nearest to it by Euclidean distance between fc7 vectors (paper Figure 4; drawn by
  trainer.retrieval, which serving's /similar shares).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.atomic import exits_cleanly_when_full, replacing
from pipeline.cli import setup_logging
from trainer.runfolder import read_metrics

log = logging.getLogger("trainer.figures")
LEARNING_CURVES = "learning_curves.png"
CONV1_KERNELS = "conv1_kernels.png"
RETRIEVAL = "retrieval.png"
KERNEL_SCALE, GAP, COLUMN_GAP = 4, 2, 10  # COLUMN_GAP separates column A's kernels from B's


def plot_learning_curves(rows: list[dict], out: Path) -> Path:
    import matplotlib.pyplot as plt

    fig = learning_curves_figure(rows)
    with replacing(out, suffix=out.suffix) as tmp:  # savefig picks the format from the suffix
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return out


def learning_curves_figure(rows: list[dict]):
    """The learning curves as a matplotlib Figure (plot_learning_curves saves it; trainer.board
    hands it to TensorBoard)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("no metrics to plot")
    epochs = [r["epoch"] for r in rows]
    fig, (ax_err, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for key, style, label in (
        ("train_top1_error", "C0--", "train top-1"),
        ("train_top5_error", "C1--", "train top-5"),
        ("val_top1_error", "C0-", "val top-1"),
        ("val_top5_error", "C1-", "val top-5"),
    ):
        ax_err.plot(epochs, [100 * r[key] for r in rows], style, marker="o", ms=3, label=label)
    if "val10crop_top1_error" in rows[-1]:
        ax_err.plot([epochs[-1]], [100 * rows[-1]["val10crop_top1_error"]], "C0*", ms=12, label="val top-1, 10 crops")
        ax_err.plot([epochs[-1]], [100 * rows[-1]["val10crop_top5_error"]], "C1*", ms=12, label="val top-5, 10 crops")
    ax_err.set_ylabel("error (%)")
    ax_err.set_ylim(0, 100)
    ax_err.grid(alpha=0.3)
    ax_err.legend(loc="upper right", fontsize=8)
    ax_err.set_title("AlexNet learning curves")
    ax_lr.semilogy(epochs, [r["lr"] for r in rows], "k-", marker="o", ms=3)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("epoch")
    from matplotlib.ticker import MaxNLocator

    ax_lr.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def conv1_tile(model, out: Path) -> Path:
    """Figure 3, saved: see conv1_image."""
    from PIL import Image

    with replacing(out, suffix=out.suffix) as tmp:
        Image.fromarray(conv1_image(model)).save(tmp)
    return out


def conv1_image(model):
    """Figure 3: 8 rows x 12 kernels; columns A (left 6) and B (right 6) of the model, as an
    RGB uint8 array (H, W, 3)."""
    import numpy as np

    kernels = [c.conv1.weight.detach().float().cpu().numpy() for c in model.columns]  # (48, 3, 11, 11) each
    cell = 11 * KERNEL_SCALE + GAP
    tile = np.full((8 * cell + GAP, 12 * cell + GAP + COLUMN_GAP, 3), 255, dtype=np.uint8)
    per_col = 12 // len(kernels)
    for c, weights in enumerate(kernels):
        for i, k in enumerate(weights[: 8 * per_col]):
            img = k.transpose(1, 2, 0)
            img = (img - img.min()) / max(float(img.max() - img.min()), 1e-12)  # each kernel to [0, 1]
            img = np.kron((img * 255).astype(np.uint8), np.ones((KERNEL_SCALE, KERNEL_SCALE, 1), dtype=np.uint8))
            row, col = divmod(i, per_col)
            y, x = GAP + row * cell, GAP + (c * per_col + col) * cell + c * COLUMN_GAP
            tile[y : y + 11 * KERNEL_SCALE, x : x + 11 * KERNEL_SCALE] = img
    return tile


@exits_cleanly_when_full(log)
def main(argv: list[str] | None = None) -> int:
    setup_logging()
    p = argparse.ArgumentParser(prog="python -m trainer.figures", description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="run folder (STORAGE_PATH/NAME)")
    p.add_argument("--shards", type=Path, help="shard set for the retrieval sheet (its val split)")
    a = p.parse_args(argv)
    from trainer.checkpoint import latest_checkpoint, load_model
    from trainer.checkpoint_meta import CheckpointError
    from trainer.retrieval import retrieval_sheet

    try:
        written = [plot_learning_curves(read_metrics(a.run), a.run / LEARNING_CURVES)]
        checkpoint = latest_checkpoint(a.run)
        if checkpoint is None:
            raise FileNotFoundError(f"no registered checkpoint in {a.run}")
        model, _ = load_model(checkpoint)
        written.append(conv1_tile(model, a.run / CONV1_KERNELS))
        if a.shards:
            written.append(retrieval_sheet(checkpoint, a.shards, a.run / RETRIEVAL))
    except (FileNotFoundError, ValueError, CheckpointError) as exc:
        log.error("%s", exc)
        return 2
    for path in written:
        log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
