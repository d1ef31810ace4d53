"""Training-input throughput of the two input back-ends against a naive DataLoader, same run.

    python -m benchmarks.loader [--photos ../shared/photos] [--workers 2] [--images 1024]
    python -m benchmarks.loader --gpu          # on a GPU machine: DALI mixed (nvJPEG) decoding

All read the same shard set (built here from real photographs with pipeline.shard) and
produce the same training batches: random 227 crop, random mirror, PCA lighting, mean
subtraction, CHW float32. Measured, each with as many worker processes / threads:
- baseline: the usual PyTorch recipe: `webdataset.WebDataset` reading the tars, PIL
  decoding, numpy augmentation per sample, DataLoader collating;
- webdataset: the project's fallback back-end (trainer.wds_loader.WdsLoader): exact
  epochs, seeded per (epoch, rank), libjpeg-turbo decode, batches built in the workers;
- dali_cpu: the default back-end (trainer.dali_loader.DaliLoader) with CPU decoding.
Prints JSON; target: DALI >= 4x the baseline.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.photos import resized
from pipeline.cli import setup_logging
from pipeline.shard import ShardConfig, run
from pipeline.transforms import Lighting, Normalization

REPO = Path(__file__).resolve().parents[1]
CROP = 227


def build_shards(photos: Path, n: int, tmp: Path) -> Path:
    files = sorted(photos.glob("*.jpg"))
    if not files:
        raise SystemExit(f"no .jpg photographs in {photos}")
    datas = [resized(f.read_bytes(), 500) for f in files]  # ImageNet-size copies, as the real training set
    for i in range(n):
        folder = tmp / "raw" / "train" / f"n{i % 4:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img_{i}.JPEG").write_bytes(datas[i % len(datas)])
    out = tmp / "shards"
    run(ShardConfig(src=tmp / "raw", out=out, samples_per_shard=max(1, n // 16), progress=False))
    return out


class TorchAugment:
    """The same augmentation as trainer.dali_loader's train mode, in numpy (picklable for workers)."""

    def __init__(self, norm: Normalization, lighting: Lighting):
        self.mean = np.asarray(norm.mean, dtype=np.float32)
        self.p = np.asarray(lighting.eigenvectors, dtype=np.float32)
        self.w = lighting.shift_weights().astype(np.float32)

    def __call__(self, sample):
        img = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))
        rng = np.random.default_rng()
        top, left = rng.integers(0, img.shape[0] - CROP + 1), rng.integers(0, img.shape[1] - CROP + 1)
        patch = img[top : top + CROP, left : left + CROP]
        if rng.random() < 0.5:
            patch = patch[:, ::-1]
        shift = self.p.T @ (rng.normal(0, 0.1, 3).astype(np.float32) * self.w)
        x = patch.astype(np.float32) - (self.mean - shift)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))), int(sample["cls"])


def torch_loader(shards: Path, workers: int, batch: int):
    import webdataset as wds

    from pipeline.shardset import open_shard_set

    ss = open_shard_set(shards)
    urls, _ = ss.files("train")
    aug = TorchAugment(ss.normalization(), ss.lighting())
    dataset = wds.WebDataset(
        urls, shardshuffle=False, workersplitter=wds.split_by_worker, nodesplitter=None, empty_check=False
    ).map(aug)
    return torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers, persistent_workers=workers > 0)


def wds_loader(shards: Path, workers: int, batch: int):
    from pipeline.shardset import open_shard_set
    from trainer.loaders import DataConfig
    from trainer.wds_loader import WdsLoader

    return WdsLoader(open_shard_set(shards), "train", DataConfig(mode="train", batch_size=batch, num_threads=workers))


def dali_loader(shards: Path, threads: int, batch: int, device: str):
    from pipeline.shardset import open_shard_set
    from trainer.dali_loader import DaliLoader
    from trainer.loaders import DataConfig

    return DaliLoader(
        open_shard_set(shards), "train", DataConfig(mode="train", batch_size=batch, num_threads=threads, device=device)
    )


def epoch_img_per_s(loader) -> float:
    n, t = 0, time.perf_counter()
    for _images, labels in loader:
        n += len(labels)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t)


def alternate(loaders: dict, rounds: int) -> dict[str, list[float]]:
    """One warm-up epoch each (worker start-up excluded), then alternating epochs, so that
    drift in this shared machine's speed hits every loader alike."""
    for loader in loaders.values():
        epoch_img_per_s(loader)
    rates: dict[str, list[float]] = {name: [] for name in loaders}
    for _ in range(rounds):
        for name, loader in loaders.items():
            rates[name].append(epoch_img_per_s(loader))
    return rates


def ratio(rates: dict[str, list[float]], a: str, b: str) -> float:
    """Median of the per-round ratios: each round's epochs ran back to back."""
    return round(statistics.median(x / y for x, y in zip(rates[a], rates[b])), 2)


def main(argv: list[str] | None = None) -> int:
    setup_logging(logging.WARNING)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--photos", type=Path, default=REPO.parent / "shared" / "photos")
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="DataLoader workers = DALI threads")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7, help="alternating epochs per loader")
    p.add_argument("--gpu", action="store_true", help="also measure DALI with mixed (GPU) decoding")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        shards = build_shards(a.photos, a.images, Path(tmp))
        loaders = {
            "torch": torch_loader(shards, a.workers, a.batch),
            "webdataset": wds_loader(shards, a.workers, a.batch),
            "dali_cpu": dali_loader(shards, a.workers, a.batch, "cpu"),
        }
        if a.gpu:
            loaders["dali_gpu"] = dali_loader(shards, a.workers, a.batch, "gpu")
        rates = alternate(loaders, a.rounds)
    med = {k: statistics.median(v) for k, v in rates.items()}
    result = {
        "benchmark": "loader",
        "machine": {"cpu": platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__},
        "images_per_epoch": a.images,
        "batch": a.batch,
        "workers_or_threads": a.workers,
        "rounds": a.rounds,
        "baseline_torch_dataloader_img_per_s": round(med["torch"], 1),
        "webdataset_img_per_s": round(med["webdataset"], 1),
        "dali_cpu_img_per_s": round(med["dali_cpu"], 1),
        "webdataset_over_baseline": ratio(rates, "webdataset", "torch"),
        "dali_cpu_over_baseline": ratio(rates, "dali_cpu", "torch"),
        "dali_cpu_over_webdataset": ratio(rates, "dali_cpu", "webdataset"),
    }
    if a.gpu:
        result.update(dali_gpu_mixed_img_per_s=round(med["dali_gpu"], 1), gpu=torch.cuda.get_device_name())
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
