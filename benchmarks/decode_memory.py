"""Peak memory of serving's preprocessing by image mode, against serving.budget's estimate.

    python -m benchmarks.decode_memory [--side 2000]

For each kind of image (8-bit grey/RGB/palette, with alpha, 16-bit, CMYK JPEG, WebP, ...),
a fresh process decodes one `side` x `side` image the way /predict does (`as_sharded`: the
shared preprocessing down to the 256x256 pixels the model sees) and reports the rise of its
peak RSS (VmHWM, reset to the current RSS just before) over the RSS before it: the memory
the decode of an image that size holds at its peak. First the process serves the same
kind of image at 300x300 in full (the 10 crops too), so imports, first-call allocations
and thread start-up are paid before; the same measurement for that small image is printed
beside (`small_rise_mb`), the part of each figure that does not grow with the image. The
crops (fixed size, ~6 MB for 10) are not the decode's: serving bounds them by its queue.
Prints JSON with bytes per source pixel measured and estimated (`decode_cost`, from the
header alone), and their ratio: the estimate must stay above the measurement.
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
SMALL = 300
# Peak RSS from /proc/self/status VmHWM, reset to the current RSS just before the measured
# decode (clear_refs 5), so neither the parent's figure (getrusage's ru_maxrss would carry it
# over fork + exec) nor a spike while importing hides the decode's own peak.
CHILD = """
import sys
from pipeline.preprocess import read_header
from serving.budget import decode_cost
import pipeline.sharded as t
def status(field):
    line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024
def decode(data):
    return t.as_sharded(data, quality=90, max_pixels=10**9)
def rise(data):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak RSS restarts from the current RSS (not from an import-time spike)
    before = status("VmRSS")
    decode(data)
    return status("VmHWM") - before
small = open(sys.argv[1], "rb").read()
t.eval_crops(decode(small), 227, t.Normalization((120.0, 115.0, 105.0)), ten_crop=True)  # first calls
small_rise = rise(small)
data = open(sys.argv[2], "rb").read()
estimate = decode_cost(read_header(data, max_pixels=10**9))
print(rise(data), small_rise, estimate)
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


def measure(small: Path, path: Path) -> tuple[int, int, int]:
    """(peak RSS rise decoding `path`, the same for `small`, decode_cost's estimate for `path`)."""
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(small), str(path)], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    return int(out[0]), int(out[1]), int(out[2])


def save(img: Image.Image, fmt: str, kw: dict, path: Path) -> int:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    path.write_bytes(buf.getvalue())
    return len(buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--side", type=int, default=2000)
    a = p.parse_args(argv)
    pixels = a.side * a.side
    results: dict = {"benchmark": "decode_memory", "side": a.side}
    results["baseline"] = f"the same kind at {SMALL}x{SMALL}, served first in the same process (small_rise_mb)"
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for (name, (img, fmt, kw)), (_, (little, _, _)) in zip(images(a.side).items(), images(SMALL).items()):
            small, path = Path(tmp) / f"small.{fmt.lower()}", Path(tmp) / f"image.{fmt.lower()}"
            save(little, fmt, kw, small)
            size = save(img, fmt, kw, path)
            peak, small_rise, estimate = measure(small, path)
            measured = peak / pixels
            rows.append(
                {
                    "image": name,
                    "file_kb": round(size / 1024),
                    "small_rise_mb": round(small_rise / 1e6, 1),
                    "measured_bytes_per_px": round(measured, 1),
                    "estimated_bytes_per_px": round(estimate / pixels, 1),
                    "estimate_over_measured": round(estimate / pixels / measured, 2) if measured else None,
                }
            )
        results["modes"] = rows
        results["estimate_covers_all"] = all(r["estimated_bytes_per_px"] >= r["measured_bytes_per_px"] for r in rows)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
