"""`python -m trainer.evaluate CHECKPOINT --data SHARDS`: top-1 and top-5 error of any checkpoint
on a shard set's validation split, with the centre crop and with the paper's 10 crops
(softmax averaged over four corners, the centre and their mirrors), as torchvision's
`--test-only`. No Ray: one process, the same input pipeline (DALI, or the webdataset
back-end where DALI does not import, or as `--loader` says) and the same `evaluate` the
trainer uses, with the checkpoint's own normalisation and input size.

CHECKPOINT is a checkpoint folder or a run folder (its newest checkpoint). Prints a summary
and the numbers as JSON on stdout (`--json PATH` writes them to a file as well).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from pipeline.atomic import exits_cleanly_when_full
from pipeline.cli import Flag, add_fields, given, setup_logging
from pipeline.shardset import ShardSetError, open_shard_set
from trainer.checkpoint import load_model, resolve
from trainer.checkpoint_meta import CheckpointError
from trainer.engine import evaluate
from trainer.loaders import CHOICES as LOADER_CHOICES
from trainer.loaders import DataConfig, LoaderUnavailable, open_loader, resolve_device, resolve_loader

log = logging.getLogger("trainer.evaluate")
MODES = {"center": "val", "ten_crop": "val10crop"}


@dataclass(frozen=True)
class EvalConfig:
    checkpoint: Path  # a checkpoint folder, or a run folder (its newest checkpoint)
    data: Path  # the shard set
    split: str = "val"
    batch_size: int = 32
    ten_crop: bool = True  # also the paper's 10-crop test (else the centre crop only)
    device: Literal["auto", "cpu", "gpu"] = "auto"
    threads: int = 2  # DALI threads, or webdataset DataLoader processes
    loader: str = "auto"  # input back-end (trainer.loaders)
    json: Path | None = None  # also write the result here


FLAGS = {
    "checkpoint": Flag("checkpoint folder, or a run folder (its newest checkpoint)", positional=True),
    "data": Flag("shard set (python -m pipeline.shard)", required=True),
    "split": Flag("the shard set's split to evaluate"),
    "batch_size": Flag("images per batch"),
    "ten_crop": Flag("the paper's 10-crop test as well as the centre crop (--no-ten-crop: centre crop only)"),
    "device": Flag("where to decode and run the model"),
    "threads": Flag("DALI threads, or webdataset DataLoader processes"),
    "loader": Flag("input back-end: auto is DALI where nvidia.dali imports, else webdataset", choices=LOADER_CHOICES),
    "json": Flag("also write the result here", metavar="PATH"),
}


def _progress(loader, mode: str, every_s: float = 30.0):
    """The loader's batches, with a line every `every_s` seconds (50,000 images take a while)."""
    total, last = len(loader), time.perf_counter()
    for i, batch in enumerate(loader, 1):
        if time.perf_counter() - last >= every_s:
            last = time.perf_counter()
            log.info("%s: batch %d/%d", mode, i, total)
        yield batch


def evaluate_checkpoint(cfg: EvalConfig) -> dict:
    kind_of_loader = resolve_loader(cfg.loader)
    folder = resolve(cfg.checkpoint).checkpoint
    kind = resolve_device(cfg.device)
    torch_device = torch.device("cuda", torch.cuda.current_device()) if kind == "gpu" else torch.device("cpu")
    model, meta = load_model(folder, device=torch_device)
    shards = open_shard_set(cfg.data, meta.input_size)
    theirs = [c["wnid"] for c in shards.manifest["classes"]]
    if meta.wnids != theirs:
        raise ShardSetError(
            f"{cfg.data} has other classes than {folder} was trained on ({len(theirs)} vs "
            f"{len(meta.wnids)}, or a different order): its labels would not mean the same"
        )
    result = {
        "checkpoint": str(folder),
        "epoch": meta.epoch,
        "data": str(Path(cfg.data).resolve()),
        "split": cfg.split,
        "images": shards.num_samples(cfg.split),
        "loader": kind_of_loader,
    }
    for mode in ("center", "ten_crop") if cfg.ten_crop else ("center",):
        batches = open_loader(
            kind_of_loader,
            shards,
            cfg.split,
            DataConfig(
                mode=mode,
                batch_size=cfg.batch_size,
                input_size=meta.input_size,
                num_threads=cfg.threads,
                device=kind,
                device_id=torch_device.index,
                normalization=meta.normalization,
            ),
        )
        tally = evaluate(model, _progress(batches, mode), device=torch_device)
        metrics = tally.metrics(MODES[mode])
        result.update({k.replace(f"{MODES[mode]}_", f"{mode}_"): v for k, v in metrics.items()})
    return result


def parse_args(argv: list[str] | None = None) -> EvalConfig:
    p = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=__doc__.split("\n\n")[0])
    names = add_fields(p, EvalConfig, flags=FLAGS)
    return EvalConfig(**given(p.parse_args(argv), names))


@exits_cleanly_when_full(log)
def main(argv: list[str] | None = None) -> int:
    setup_logging()
    cfg = parse_args(argv)
    try:
        r = evaluate_checkpoint(cfg)
    except (CheckpointError, ShardSetError, LoaderUnavailable) as exc:
        log.error("%s", exc)
        return 2
    log.info(
        "%s (epoch %s) on %d %s images: centre crop top-1 error %.3f, top-5 error %.3f",
        r["checkpoint"],
        r["epoch"],
        r["images"],
        r["split"],
        r["center_top1_error"],
        r["center_top5_error"],
    )
    if cfg.ten_crop:
        log.info("10 crops: top-1 error %.3f, top-5 error %.3f", r["ten_crop_top1_error"], r["ten_crop_top5_error"])
    text = json.dumps(r, indent=2, sort_keys=True)
    print(text)
    if cfg.json:
        cfg.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
