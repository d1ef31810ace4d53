"""The sharding command, timed as a user runs it, against a naive sharder in the same run.

    python -m benchmarks.shard [--photos ../shared/photos] [--rounds 3]

For two classes of real photographs (../shared/photos re-encoded at 640x480-class size, as
most of ImageNet is; and the originals of >= 1000 px a side):
- ours:  `python -m pipeline.shard --src TREE --out OUT --workers W --quiet` as a subprocess,
         on the first N1 and then all N2 files of a raw tree (`--limit N1`); the per-image
         cost is the marginal (T(N2) - T(N1)) / (N2 - N1), so interpreter start-up, imports
         and worker spawning are excluded and everything per image (read, decode, resize,
         encode, stats, tar, index, records) is included.
- naive: a sharder loop written the obvious way, run in this process over the same N2 files:
         read, Pillow full decode, bilinear resize of the whole image (shorter side 256),
         centre crop, Pillow JPEG q90, tarfile. Per image = total / N2.
Rounds alternate ours and naive; the figures are medians over rounds. Also: 1 vs 2 worker
processes (640x480 class), the share of stats.json's accumulation in our per-image time,
the JPEG decode floor, and PSNR of ours and naive against a Lanczos reference of the same
centre square. Prints JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np
import simplejpeg
from PIL import Image

from benchmarks.photos import IMAGENET_SIZE, cut, resized
from pipeline.cli import setup_logging
from pipeline.decode import dct_scale, decode_jpeg
from pipeline.preprocess import DEFAULT_JPEG_QUALITY, OUTPUT_SIZE, encode_jpeg, open_image, prepare_image
from pipeline.resample import antialias, centre_square
from pipeline.stats import PixelMoments

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("benchmarks.shard")


def naive_sample(data: bytes) -> bytes:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    s = OUTPUT_SIZE / min(w, h)
    img = img.resize((max(OUTPUT_SIZE, round(w * s)), max(OUTPUT_SIZE, round(h * s))), Image.Resampling.BILINEAR)
    left, top = (img.size[0] - OUTPUT_SIZE) // 2, (img.size[1] - OUTPUT_SIZE) // 2
    buf = io.BytesIO()
    img.crop((left, top, left + OUTPUT_SIZE, top + OUTPUT_SIZE)).save(buf, format="JPEG", quality=DEFAULT_JPEG_QUALITY)
    return buf.getvalue()


def naive_sharder(files: list[Path], out: Path) -> float:
    """The baseline: the obvious loop, one tar. Seconds per image."""
    t = time.perf_counter()
    with tarfile.open(out, "w") as tar:
        for i, path in enumerate(files):
            jpg = naive_sample(path.read_bytes())
            for ext, payload in (("jpg", jpg), ("cls", str(i % 4).encode())):
                info = tarfile.TarInfo(f"{path.stem}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return (time.perf_counter() - t) / len(files)


def shard_command(src: Path, out: Path, workers: int, shard_size: int, limit: int | None) -> float:
    """Wall seconds of `python -m pipeline.shard` end to end."""
    # fmt: off
    cmd = [sys.executable, "-m", "pipeline.shard", "--src", str(src), "--out", str(out), "--workers", str(workers),
           "--shard-size", str(shard_size), "--quiet", "--ray-address", "off"]
    # fmt: on
    if limit:
        cmd += ["--limit", str(limit)]
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"pipeline.shard failed: {r.stderr[-2000:]}")
    shutil.rmtree(out)
    return dt


def marginal(src: Path, tmp: Path, workers: int, shard_size: int, n1: int, n2: int) -> float:
    """Seconds per image of the command between a run over n1 and one over n2 files."""
    t1 = shard_command(src, tmp / "out1", workers, shard_size, n1)
    t2 = shard_command(src, tmp / "out2", workers, shard_size, None)
    return (t2 - t1) / (n2 - n1)


def make_tree(photos: list[bytes], root: Path, n: int) -> list[Path]:
    """n files, the photos cycled, over 4 class folders (a raw ImageNet train layout)."""
    files = []
    for i in range(n):
        path = root / "train" / f"n0000000{i % 4}" / f"img_{i:06d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(photos[i % len(photos)])
        files.append(path)
    return sorted(files)


def square_reference(data: bytes, method: Image.Resampling = Image.Resampling.LANCZOS) -> np.ndarray:
    """The centre square of the full decode, resized by Pillow (Lanczos: the reference)."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    left, top, side = centre_square(*img.size)
    return np.asarray(
        img.crop((left, top, left + side, top + side)).resize((OUTPUT_SIZE, OUTPUT_SIZE), method),
        dtype=np.float64,
    )


def mean_psnr(images: list[np.ndarray], refs: list[np.ndarray]) -> float:
    return round(float(np.mean([psnr(p, r) for p, r in zip(images, refs)])), 2)


def as_written(pixels: np.ndarray) -> np.ndarray:
    """The pixels the trainer reads back from a shard for these (the JPEG at the shard quality)."""
    return simplejpeg.decode_jpeg(encode_jpeg(pixels, DEFAULT_JPEG_QUALITY), colorspace="RGB")


def psnr(pixels: np.ndarray, ref: np.ndarray) -> float:
    return float(10 * np.log10(255**2 / np.mean((pixels.astype(np.float64) - ref) ** 2)))


def per_image(fn: Callable[[T], object], images: list[T], repeat: int = 5) -> float:
    best = []
    for _ in range(repeat):
        t = time.perf_counter()
        for d in images:
            fn(d)
        best.append((time.perf_counter() - t) / len(images))
    return statistics.median(best)


def stage_costs(photos: list[bytes], rounds: int = 7) -> dict[str, float]:
    """ms per image of each step of `prepare_image` + the encode + the statistics, in this
    process: the header (Pillow identifies the format, the bomb check), the strict decode at
    the DCT scale (of the centre square's rows and columns: libjpeg-turbo decodes them all),
    the anti-aliasing filter, OpenCV's cubic resize, the JPEG encode, the statistics. Steps
    alternate in every round (median over rounds), so a busy machine slows all alike."""
    headers = [open_image(d) for d in photos]
    squares = [decode_jpeg(d, img, OUTPUT_SIZE)[0] for d, img in zip(photos, headers)]
    filtered = [antialias(np.ascontiguousarray(q), OUTPUT_SIZE) for q in squares]
    pixels = [prepare_image(d).pixels for d in photos]
    moments = PixelMoments()
    steps: dict[str, tuple[Callable, list]] = {
        "header": (open_image, photos),
        "decode": (lambda d: decode_jpeg(d, open_image(d), OUTPUT_SIZE), photos),
        "antialias_filter": (lambda q: antialias(q, OUTPUT_SIZE), squares),
        "cubic_resize": (lambda f: cv2.resize(f, (OUTPUT_SIZE, OUTPUT_SIZE), interpolation=cv2.INTER_CUBIC), filtered),
        "encode": (encode_jpeg, pixels),
        "stats": (moments.add_image, pixels),
    }
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(rounds):
        for name in list(steps) if r % 2 == 0 else list(steps)[::-1]:
            fn, items = steps[name]
            times[name].append(per_image(fn, items, repeat=1))
    out = {k: round(statistics.median(v) * 1e3, 4) for k, v in times.items()}
    out["decode"] = round(out["decode"] - out["header"], 4)  # its open_image is the header step
    return out


def decode_floor(data: bytes) -> None:
    h, w = simplejpeg.decode_jpeg_header(data)[:2]
    k = dct_scale(w, h, OUTPUT_SIZE)
    simplejpeg.decode_jpeg(data, min_width=-(-w // k), min_height=-(-h // k))


def bench_class(
    photos: list[bytes], tmp: Path, n1: int, n2: int, shard_size: int, rounds: int, workers: tuple[int, ...]
) -> dict:
    src = tmp / "raw"
    files = make_tree(photos, src, n2)
    ours: dict[int, list[float]] = {w: [] for w in workers}
    naive = []
    for r in range(rounds):
        naive.append(naive_sharder(files, tmp / "naive.tar"))
        for w in workers:
            ours[w].append(marginal(src, tmp, w, shard_size, n1, n2))
        log.info(
            "round %d: naive %.2f ms, ours %s",
            r + 1,
            naive[-1] * 1e3,
            ", ".join(f"{w} worker(s) {ours[w][-1] * 1e3:.2f} ms" for w in workers),
        )
    shutil.rmtree(src)
    (tmp / "naive.tar").unlink()
    ours_ms = {w: statistics.median(v) * 1e3 for w, v in ours.items()}
    naive_ms = statistics.median(naive) * 1e3
    prepared = [prepare_image(d).pixels for d in photos]

    def stats_of(px):
        PixelMoments().add_image(px)

    stats_ms = per_image(stats_of, prepared) * 1e3
    refs = [square_reference(d) for d in photos]
    bicubic = [square_reference(d, Image.Resampling.BICUBIC).astype(np.uint8) for d in photos]
    ratios = [n / o for n, o in zip(naive, ours[1])] if 1 in ours else []
    out = {
        "photos": len(photos),
        "mean_size": [round(float(np.mean([Image.open(io.BytesIO(d)).size[i] for d in photos]))) for i in (0, 1)],
        "images_n1_n2": [n1, n2],
        "shard_size": shard_size,
        "naive_ms_per_image": round(naive_ms, 3),
        "ours_ms_per_image": {f"workers_{w}": round(v, 3) for w, v in ours_ms.items()},
        # The ratio of the medians, and (robust to a machine whose speed drifts between
        # rounds) the median of each round's own ratio, naive and ours timed back to back.
        "speedup_vs_naive": {f"workers_{w}": round(naive_ms / v, 2) for w, v in ours_ms.items()},
        "speedup_vs_naive_median_of_rounds_1_worker": round(statistics.median(ratios), 2) if ratios else None,
        "rounds": {
            "naive_ms": [round(v * 1e3, 3) for v in naive],
            **{f"ours_workers_{w}_ms": [round(v * 1e3, 3) for v in ours[w]] for w in workers},
            "speedup_1_worker": [round(v, 2) for v in ratios],
        },
        "function_ms_per_image": round(per_image(lambda d: encode_jpeg(prepare_image(d).pixels), photos) * 1e3, 3),
        "decode_floor_ms_per_image": round(per_image(decode_floor, photos) * 1e3, 3),
        "stages_ms_per_image": stage_costs(photos),
        "stats_ms_per_image": round(stats_ms, 4),
        "stats_share_of_ours_1_worker": round(stats_ms / ours_ms[1], 4) if 1 in ours_ms else None,
        # Against Pillow's Lanczos of the same centre square of the full decode: our pixels,
        # what the sharder writes (its JPEG, decoded), the bar (Pillow's anti-aliased bicubic,
        # and the same through the shard JPEG), and the naive loop's output.
        "psnr_vs_lanczos_db": {
            "ours": mean_psnr(prepared, refs),
            "ours_sharded_jpeg": mean_psnr([as_written(p) for p in prepared], refs),
            "pillow_bicubic": mean_psnr(bicubic, refs),
            "pillow_bicubic_sharded_jpeg": mean_psnr([as_written(b) for b in bicubic], refs),
            "naive": mean_psnr([np.asarray(Image.open(io.BytesIO(naive_sample(d)))) for d in photos], refs),
        },
    }
    if 1 in ours_ms and 2 in ours_ms:
        out["two_workers_over_one"] = round(ours_ms[1] / ours_ms[2], 2)
    return out


SETS = ("500x375_class", "640x480_class", "large_ge_1000px")


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--photos", type=Path, default=REPO.parent / "shared" / "photos")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS), help="which photo sets to run")
    for flag, default, kind in (
        ("--imagenet", (512, 1536), "500x375-class"),
        ("--small", (512, 1536), "640x480-class"),
        ("--large", (96, 288), ">= 1000 px"),
    ):
        p.add_argument(
            flag, type=int, nargs=2, default=default, metavar=("N1", "N2"), help=f"set sizes for the {kind} photos"
        )
    a = p.parse_args(argv)
    files = sorted(a.photos.glob("*.jpg"))
    if not files:
        p.error(f"no .jpg photographs in {a.photos}")
    photos = [f.read_bytes() for f in files]
    sets = {
        # ImageNet's typical image: each photo cut to 500x375 (375x500 if portrait).
        "500x375_class": lambda: ([cut(d, IMAGENET_SIZE) for d in photos], a.imagenet, 256, (1, 2)),
        "640x480_class": lambda: ([resized(d, 640) for d in photos], a.small, 256, (1, 2)),
        "large_ge_1000px": lambda: (
            [d for d in photos if min(Image.open(io.BytesIO(d)).size) >= 1000],
            a.large,
            48,
            (1,),
        ),
    }
    with tempfile.TemporaryDirectory() as tmp:
        result: dict = {
            "benchmark": "shard",
            "command": "python -m pipeline.shard --src TREE --out OUT --workers W --shard-size S --quiet",
            "per_image": "marginal: (T(N2) - T(N1)) / (N2 - N1), median over rounds",
            "baseline": "naive sharder loop in this process: read, Pillow full decode, bilinear resize, centre "
            "crop, Pillow JPEG q90, tarfile",
            "machine": {
                "cpu": platform.processor() or platform.machine(),
                "cores": os.cpu_count(),
                "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
                "python": platform.python_version(),
                "pillow": Image.__version__,
                "simplejpeg": simplejpeg.__version__,
            },
            "photos": str(a.photos),
        }
        for name in a.sets:
            images, (n1, n2), shard_size, workers = sets[name]()
            result[name] = bench_class(
                images, Path(tmp), n1, n2, shard_size=shard_size, rounds=a.rounds, workers=workers
            )
        result["machine"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
