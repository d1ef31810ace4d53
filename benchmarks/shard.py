"""Sharder speed on real photographs, against a naive baseline and the decode floor, in one run.

    python -m benchmarks.shard [--photos ../shared/photos] [--repeat 5]

Per size class (ImageNet-size ~500x375, made from the photos; and the photos themselves,
>= 1000 px a side), per image, single process:
- naive:    PIL full decode, bilinear resize of the whole image, centre crop, encode q90
- ours:     pipeline.preprocess.prepare_image + encode_jpeg (what the sharder runs)
- floor:    the JPEG decode alone at the smallest DCT scale keeping the shorter side >= 256
plus output PSNR against a full-decode LANCZOS reference, and the whole sharder
(`pipeline.shard`) at 1 vs 2 worker processes on a raw tree built from the photos.
Prints JSON.
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
import simplejpeg
from PIL import Image

from pipeline.preprocess import encode_jpeg, prepare_image
from pipeline.shard import ShardConfig, run

REPO = Path(__file__).resolve().parents[1]


def naive(data: bytes) -> bytes:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    s = 256 / min(w, h)
    img = img.resize((max(256, round(w * s)), max(256, round(h * s))), Image.BILINEAR)
    left, top = (img.size[0] - 256) // 2, (img.size[1] - 256) // 2
    buf = io.BytesIO()
    img.crop((left, top, left + 256, top + 256)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def ours(data: bytes) -> bytes:
    return encode_jpeg(prepare_image(data).pixels, 90)


def floor(data: bytes) -> None:
    """The decode alone, at the smallest libjpeg-turbo n/8 scale keeping the shorter side >= 256."""
    h, w = simplejpeg.decode_jpeg_header(data)[:2]
    s = 256 / min(w, h)
    simplejpeg.decode_jpeg(data, min_width=int(np.ceil(w * s)), min_height=int(np.ceil(h * s)))


def reference(data: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    s = 256 / min(w, h)
    img = img.resize((max(256, round(w * s)), max(256, round(h * s))), Image.LANCZOS)
    left, top = (img.size[0] - 256) // 2, (img.size[1] - 256) // 2
    return np.asarray(img.crop((left, top, left + 256, top + 256)), dtype=np.float64)


def psnr(out_jpeg: bytes, ref: np.ndarray) -> float:
    out = np.asarray(Image.open(io.BytesIO(out_jpeg)), dtype=np.float64)
    return float(10 * np.log10(255**2 / np.mean((out - ref) ** 2)))


def imagenet_size(data: bytes) -> bytes:
    """A photo re-encoded at ImageNet's typical size (~500x375, q90, as Flickr JPEGs were)."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    s = 500 / max(w, h)
    buf = io.BytesIO()
    img.resize((round(w * s), round(h * s)), Image.LANCZOS).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def time_per_image(fn, images: list[bytes], repeat: int) -> float:
    """Median over `repeat` passes of the mean seconds per image."""
    passes = []
    for _ in range(repeat):
        t = time.perf_counter()
        for data in images:
            fn(data)
        passes.append((time.perf_counter() - t) / len(images))
    return statistics.median(passes)


def bench_size_class(images: list[bytes], repeat: int) -> dict:
    t_naive, t_ours, t_floor = (time_per_image(f, images, repeat) for f in (naive, ours, floor))
    refs = [reference(d) for d in images]
    return {
        "images": len(images),
        "mean_size": [round(float(np.mean([Image.open(io.BytesIO(d)).size[i] for d in images]))) for i in (0, 1)],
        "naive_ms": round(t_naive * 1e3, 3),
        "ours_ms": round(t_ours * 1e3, 3),
        "floor_ms": round(t_floor * 1e3, 3),
        "speedup_vs_naive": round(t_naive / t_ours, 2),
        "floor_speedup_vs_naive": round(t_naive / t_floor, 2),
        "ours_over_floor": round(t_ours / t_floor, 2),
        "psnr_ours_db": round(float(np.mean([psnr(ours(d), r) for d, r in zip(images, refs)])), 2),
        "psnr_naive_db": round(float(np.mean([psnr(naive(d), r) for d, r in zip(images, refs)])), 2),
    }


def bench_workers(photos: list[bytes], per_class: int) -> dict:
    """The whole sharder on a raw tree of ImageNet-size photos, 1 vs 2 worker processes."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "raw"
        small = [imagenet_size(d) for d in photos]
        for c in range(4):
            folder = src / "train" / f"n0000000{c}"
            folder.mkdir(parents=True)
            for k in range(per_class):
                (folder / f"img_{k}.JPEG").write_bytes(small[(c * per_class + k) % len(small)])
        n = 4 * per_class
        for workers in (1, 2):
            t = time.perf_counter()
            run(ShardConfig(src=src, out=Path(tmp) / f"out{workers}", workers=workers, samples_per_shard=32,
                            progress=False))
            dt = time.perf_counter() - t
            results[f"workers_{workers}_img_per_s"] = round(n / dt, 1)
        results["scaling_2_over_1"] = round(results["workers_2_img_per_s"] / results["workers_1_img_per_s"], 2)
        results["images"] = n
    return results


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--photos", type=Path, default=REPO.parent / "shared" / "photos")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--per-class", type=int, default=256, help="images per class in the 1-vs-2-worker tree")
    a = p.parse_args(argv)
    files = sorted(a.photos.glob("*.jpg"))
    if not files:
        p.error(f"no .jpg photographs in {a.photos}")
    photos = [f.read_bytes() for f in files]
    large = [d for d in photos if min(Image.open(io.BytesIO(d)).size) >= 1000]
    result = {
        "benchmark": "shard",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "pillow": Image.__version__},
        "photos": str(a.photos),
        "imagenet_size": bench_size_class([imagenet_size(d) for d in photos], a.repeat),
        "large_ge_1000px": bench_size_class(large, a.repeat),
        "sharder": bench_workers(photos, a.per_class),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
