"""Peak memory of serving's preprocessing by image mode, against serving.budget's estimate.

    python -m benchmarks.decode_memory [--side 2000]

For each kind of image (8-bit grey/RGB/palette, with alpha, 16-bit, CMYK JPEG, WebP, ...),
a fresh process decodes one `side` x `side` image the way /predict does (the serving
preprocessing: `as_sharded`, then the 10 crops) and reports the rise of its peak RSS
(VmHWM). The baseline, same run: the same process decoding a 300x300
JPEG (imports, allocator and thread start-up), subtracted from every figure. Prints JSON
with bytes per source pixel measured and estimated (`decode_cost`), and their ratio: the
estimate must stay above the measurement.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# Peak RSS from /proc/self/status VmHWM: per address space, so a fresh exec starts from zero
# (getrusage's ru_maxrss would carry over the parent's figure across fork + exec).
CHILD = """
import io, sys
from PIL import Image
from serving.budget import decode_cost
import pipeline.transforms as t
def hwm():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024
data = open(sys.argv[1], "rb").read()
estimate = decode_cost(Image.open(io.BytesIO(data)))
before = hwm()
pixels = t.as_sharded(data, quality=90, max_pixels=10**9)
t.eval_crops(pixels, 227, t.Normalization((120.0, 115.0, 105.0)), ten_crop=True)
print(hwm() - before, estimate)
"""


def images(side: int) -> dict[str, tuple[Image.Image, str, dict]]:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    rgb = Image.fromarray(noise)
    palette = rgb.quantize(256)
    ramp = (np.arange(side * side, dtype=np.uint32) * 7 % 65536).astype(np.uint16).reshape(side, side)
    return {
        "L (PNG)": (Image.fromarray(noise[..., 0]), "PNG", {"compress_level": 1}),
        "1 (PNG)": (Image.fromarray(noise[..., 0] > 127), "PNG", {}),
        "RGB (PNG)": (rgb, "PNG", {"compress_level": 1}),
        "RGB (BMP)": (rgb, "BMP", {}),
        "P (PNG)": (palette, "PNG", {"compress_level": 1}),
        "P + transparency (PNG)": (palette, "PNG", {"compress_level": 1, "transparency": 0}),
        "LA (PNG)": (Image.fromarray(np.ascontiguousarray(noise[..., :2]), "LA"), "PNG", {"compress_level": 1}),
        "RGBA (PNG)": (Image.fromarray(np.dstack([noise, noise[..., :1]])), "PNG", {"compress_level": 1}),
        "I;16 (16-bit PNG)": (Image.fromarray(ramp), "PNG", {"compress_level": 1}),
        "RGB (WebP)": (rgb, "WEBP", {"quality": 80}),
        "RGB (JPEG, DCT-scaled)": (rgb, "JPEG", {"quality": 90}),
        "CMYK (JPEG)": (rgb.convert("CMYK"), "JPEG", {"quality": 90}),
    }


def measure(path: Path) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path)], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.split()
    return int(out[0]), int(out[1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--side", type=int, default=2000)
    a = p.parse_args(argv)
    pixels = a.side * a.side
    results: dict = {"benchmark": "decode_memory", "side": a.side}
    with tempfile.TemporaryDirectory() as tmp:
        small = Path(tmp) / "small.jpg"
        Image.new("RGB", (300, 300), (90, 40, 20)).save(small, quality=90)
        baseline, _ = measure(small)
        results["baseline_bytes"] = baseline
        rows = []
        for name, (img, fmt, kw) in images(a.side).items():
            path = Path(tmp) / f"image.{fmt.lower()}"
            buf = io.BytesIO()
            img.save(buf, fmt, **kw)
            path.write_bytes(buf.getvalue())
            peak, estimate = measure(path)
            measured = max(0, peak - baseline) / pixels
            rows.append({"image": name, "file_kb": round(len(buf.getvalue()) / 1024),
                         "measured_bytes_per_px": round(measured, 1),
                         "estimated_bytes_per_px": round(estimate / pixels, 1),
                         "estimate_over_measured": round(estimate / pixels / measured, 2) if measured else None})
        results["modes"] = rows
        results["estimate_covers_all"] = all(r["estimated_bytes_per_px"] >= r["measured_bytes_per_px"] for r in rows)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
