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
from pathlib import Path

import torch

from pipeline.transforms import Normalization
from trainer.checkpoint import CheckpointError, load_model, resolve
from pipeline.shardset import ShardSetError, open_shard_set
from trainer.data import DataConfig, resolve_device
from trainer.engine import evaluate
from trainer.loaders import CHOICES as LOADER_CHOICES
from trainer.loaders import LoaderUnavailable, open_loader, resolve_loader

log = logging.getLogger("trainer.evaluate")
MODES = {"center": "val", "ten_crop": "val10crop"}


def _progress(loader, mode: str, every_s: float = 30.0):
    """The loader's batches, with a line every `every_s` seconds (50,000 images take a while)."""
    total, last = len(loader), time.perf_counter()
    for i, batch in enumerate(loader, 1):
        if time.perf_counter() - last >= every_s:
            last = time.perf_counter()
            log.info("%s: batch %d/%d", mode, i, total)
        yield batch


def evaluate_checkpoint(checkpoint: Path | str, data: Path | str, *, split: str = "val", batch_size: int = 32,
                        ten_crop: bool = True, device: str = "auto", threads: int = 2, loader: str = "auto") -> dict:
    kind_of_loader = resolve_loader(loader)
    folder = resolve(checkpoint)
    kind = resolve_device(device)
    torch_device = torch.device("cuda", torch.cuda.current_device()) if kind == "gpu" else torch.device("cpu")
    model, meta = load_model(folder, device=torch_device)
    shards = open_shard_set(data, int(meta["input_size"]))
    ours = [c["wnid"] for c in meta["classes"]]
    theirs = [c["wnid"] for c in shards.manifest["classes"]]
    if ours != theirs:
        raise ShardSetError(f"{data} has other classes than {folder} was trained on ({len(theirs)} vs {len(ours)}, "
                            "or a different order): its labels would not mean the same")
    result = {"checkpoint": str(folder), "epoch": meta.get("epoch"), "data": str(Path(data).resolve()),
              "split": split, "images": shards.num_samples(split), "loader": kind_of_loader}
    for mode in (("center", "ten_crop") if ten_crop else ("center",)):
        batches = open_loader(kind_of_loader, shards, split, DataConfig(
            mode=mode, batch_size=batch_size, input_size=int(meta["input_size"]), num_threads=threads, device=kind,
            device_id=torch_device.index, normalization=Normalization.from_json(meta["normalization"])))
        tally = evaluate(model, _progress(batches, mode), device=torch_device)
        metrics = tally.metrics(MODES[mode])
        result.update({k.replace(f"{MODES[mode]}_", f"{mode}_"): v for k, v in metrics.items()})
    return result


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument("--data", type=Path, required=True, help="shard set (python -m pipeline.shard)")
    p.add_argument("--split", default="val")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-ten-crop", dest="ten_crop", action="store_false", help="centre crop only")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    p.add_argument("--threads", type=int, default=2, help="DALI threads, or webdataset DataLoader processes")
    p.add_argument("--loader", choices=LOADER_CHOICES, default="auto",
                   help="input back-end: auto is DALI where nvidia.dali imports, else webdataset")
    p.add_argument("--json", type=Path, help="also write the result here")
    a = p.parse_args(argv)
    try:
        r = evaluate_checkpoint(a.checkpoint, a.data, split=a.split, batch_size=a.batch_size, ten_crop=a.ten_crop,
                                device=a.device, threads=a.threads, loader=a.loader)
    except (CheckpointError, ShardSetError, LoaderUnavailable) as exc:
        log.error("%s", exc)
        return 2
    log.info("%s (epoch %s) on %d %s images: centre crop top-1 error %.3f, top-5 error %.3f", r["checkpoint"],
             r["epoch"], r["images"], r["split"], r["center_top1_error"], r["center_top5_error"])
    if a.ten_crop:
        log.info("10 crops: top-1 error %.3f, top-5 error %.3f", r["ten_crop_top1_error"], r["ten_crop_top5_error"])
    text = json.dumps(r, indent=2, sort_keys=True)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
