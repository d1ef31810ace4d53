"""Figures from a run folder: the learning curves (top-1/top-5 error and lr per epoch).

    python -m trainer.figures RUN_DIR        # writes RUN_DIR/learning_curves.png
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("trainer.figures")
LEARNING_CURVES = "learning_curves.png"


def plot_learning_curves(rows: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("no metrics to plot")
    epochs = [r["epoch"] for r in rows]
    fig, (ax_err, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for key, style, label in (("train_top1_error", "C0--", "train top-1"), ("train_top5_error", "C1--", "train top-5"),
                              ("val_top1_error", "C0-", "val top-1"), ("val_top5_error", "C1-", "val top-5")):
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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
    return out


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a run folder?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m trainer.figures", description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="run folder (STORAGE_PATH/NAME)")
    a = p.parse_args(argv)
    try:
        out = plot_learning_curves(read_metrics(a.run), a.run / LEARNING_CURVES)
    except (FileNotFoundError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
