"""`python -m pipeline.sample --out DIR`: the built-in sample data.

A small raw tree in ImageNet's own layout, so a newcomer with no ImageNet can run every
stage: 10 classes named by real wnids (Imagenette's), a few hundred synthetic photos of
mixed sizes and aspect ratios, and the odd files real ImageNet has (greyscale, CMYK, a PNG
named .JPEG, alpha, 16-bit, EXIF-rotated) plus a few broken ones the sharder must skip and
report. Each class is a coloured shape on a textured background, jittered in hue, size,
position and rotation, so a CNN visibly learns it in a few CPU minutes.

Generated deterministically from --seed: the same command always writes the same bytes.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from pipeline.atomic import exits_cleanly_when_full
from pipeline.cli import setup_logging

log = logging.getLogger("pipeline.sample")

# Imagenette's ten classes: real ILSVRC-2012 wnids, easy to tell apart by name.
CLASSES = (
    ("n01440764", "circle"),
    ("n02102040", "square"),
    ("n02979186", "triangle"),
    ("n03000684", "cross"),
    ("n03028079", "ring"),
    ("n03394916", "hstripes"),
    ("n03417042", "vstripes"),
    ("n03425413", "diamond"),
    ("n03445777", "checker"),
    ("n03888257", "bar"),
)
VAL_LAYOUTS = ("folders", "kaggle", "devkit")
MARKER = "SAMPLE.json"


@dataclass(frozen=True)
class SampleConfig:
    out: Path
    train_per_class: int = 30
    val_per_class: int = 10
    val_layout: str = "folders"
    seed: int = 0


def _class_hue(index: int) -> float:
    return index / len(CLASSES)


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    import colorsys

    return tuple(int(round(c * 255)) for c in colorsys.hsv_to_rgb(h % 1.0, s, v))  # type: ignore[return-value]


def draw_image(class_index: int, rng: np.random.RandomState) -> Image.Image:
    """One synthetic photo of class `class_index`: its shape in its hue, on clutter."""
    shorter = int(rng.randint(160, 420))
    aspect = float(rng.uniform(0.65, 1.7))
    if rng.rand() < 0.08:  # a few large photos, to exercise decode-time downscaling
        shorter = int(rng.randint(700, 1100))
    w, h = (int(shorter * aspect), shorter) if rng.rand() < 0.6 else (shorter, int(shorter * aspect))
    # Background: smooth random colour field plus noise (cheap "texture").
    base = rng.randint(40, 200, size=3)
    coarse = rng.randint(-50, 50, size=(4, 4, 3))
    field = np.asarray(
        Image.fromarray(np.clip(base + coarse, 0, 255).astype(np.uint8)).resize((w, h), Image.Resampling.BILINEAR)
    )
    noise = rng.randint(-18, 18, size=(h, w, 1))
    img = Image.fromarray(np.clip(field.astype(np.int16) + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    # A few distractor blobs in random colours.
    for _ in range(int(rng.randint(1, 4))):
        br = int(rng.uniform(0.05, 0.12) * min(w, h))
        x, y = int(rng.uniform(0, w)), int(rng.uniform(0, h))
        draw.ellipse((x - br, y - br, x + br, y + br), fill=tuple(int(c) for c in rng.randint(0, 255, size=3)))

    kind = CLASSES[class_index][1]
    colour = _hsv_to_rgb(
        _class_hue(class_index) + rng.uniform(-0.03, 0.03), rng.uniform(0.7, 1.0), rng.uniform(0.75, 1.0)
    )
    s = min(w, h)
    r = rng.uniform(0.22, 0.34) * s
    cx, cy = w / 2 + rng.uniform(-0.12, 0.12) * s, h / 2 + rng.uniform(-0.12, 0.12) * s
    angle = rng.uniform(-0.4, 0.4)

    def poly(points):
        c, si = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * si, cy + x * si + y * c) for x, y in points]

    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif kind == "square":
        draw.polygon(poly([(-r, -r), (r, -r), (r, r), (-r, r)]), fill=colour)
    elif kind == "triangle":
        draw.polygon(poly([(0, -r), (r, r * 0.8), (-r, r * 0.8)]), fill=colour)
    elif kind == "cross":
        t = r * 0.35
        draw.polygon(poly([(-t, -r), (t, -r), (t, r), (-t, r)]), fill=colour)
        draw.polygon(poly([(-r, -t), (r, -t), (r, t), (-r, t)]), fill=colour)
    elif kind == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=colour, width=max(3, int(r * 0.3)))
    elif kind in ("hstripes", "vstripes"):
        n, t = 4, r * 0.22
        for k in range(n):
            off = -r + (k + 0.5) * 2 * r / n
            pts = [(-r, off - t / 2), (r, off - t / 2), (r, off + t / 2), (-r, off + t / 2)]
            draw.polygon(poly(pts if kind == "hstripes" else [(y, x) for x, y in pts]), fill=colour)
    elif kind == "diamond":
        draw.polygon(poly([(0, -r), (r * 0.7, 0), (0, r), (-r * 0.7, 0)]), fill=colour)
    elif kind == "checker":
        q = r / 2
        for i in range(4):
            for j in range(4):
                if (i + j) % 2 == 0:
                    x0, y0 = -r + i * q, -r + j * q
                    draw.polygon(poly([(x0, y0), (x0 + q, y0), (x0 + q, y0 + q), (x0, y0 + q)]), fill=colour)
    elif kind == "bar":
        draw.polygon(poly([(-r, -r * 0.18), (r, -r * 0.18), (r, r * 0.18), (-r, r * 0.18)]), fill=colour)
    return img


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(kw.pop("quality", 88)), **kw)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _encode_odd(img: Image.Image, oddity: str) -> bytes:
    """The odd kinds real ImageNet holds, each under a .JPEG name like ImageNet's."""
    if oddity == "grey":
        return _jpeg(img.convert("L"))
    if oddity == "png-named-jpeg":
        return _png(img)
    if oddity == "cmyk":
        return _jpeg(img.convert("CMYK"))
    if oddity == "rgba-png":
        rgba = img.convert("RGBA")
        alpha = Image.new("L", img.size, 255)
        ImageDraw.Draw(alpha).rectangle((0, 0, img.size[0] // 6, img.size[1]), fill=0)
        rgba.putalpha(alpha)
        return _png(rgba)
    if oddity == "palette":
        return _png(img.convert("P", palette=Image.Palette.ADAPTIVE, colors=64))
    if oddity == "grey16":
        arr = np.asarray(img.convert("L"), dtype=np.uint16) * 257
        return _png(Image.fromarray(arr))
    if oddity == "exif-rotated":
        # Stored rotated 90 degrees counter-clockwise with Orientation=6 ("rotate 90 CW to
        # display"): only a reader that applies EXIF sees the shape upright.
        exif = Image.Exif()
        exif[0x0112] = 6
        return _jpeg(img.transpose(Image.Transpose.ROTATE_90), exif=exif.tobytes())
    raise ValueError(oddity)


ODD_KINDS = ("grey", "png-named-jpeg", "cmyk", "rgba-png", "palette", "grey16", "exif-rotated")
# Broken files: each must be skipped and reported by the sharder, never stop it.
BROKEN = {
    "truncated": lambda good: good[: len(good) // 3],
    "empty": lambda good: b"",
    "not-an-image": lambda good: b"This is a text file that happens to be named .JPEG\n",
}


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def generate(config: SampleConfig) -> dict:
    """Write the sample tree to config.out (atomically: built beside it, then renamed)."""
    if config.val_layout not in VAL_LAYOUTS:
        raise ValueError(f"val layout must be one of {VAL_LAYOUTS}")
    out = config.out.resolve()
    marker = out / MARKER
    params = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items() if k != "out"}
    if marker.is_file() and json.loads(marker.read_text()).get("params") == params:
        log.info("sample data already at %s", out)
        return json.loads(marker.read_text())
    if out.exists() and any(out.iterdir()) and not marker.is_file():
        raise FileExistsError(f"{out} exists and is not sample data written by this command; choose another --out")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    rng = np.random.RandomState(config.seed)
    counts = {"train": 0, "val": 0, "odd": 0, "broken": 0}
    total = len(CLASSES) * (config.train_per_class + config.val_per_class)
    bar = tqdm(total=total, unit="img", desc="sample data", leave=False)

    for ci, (wnid, _) in enumerate(CLASSES):
        for k in range(config.train_per_class):
            img = draw_image(ci, rng)
            name = f"{wnid}_{k + 1}.JPEG"
            if k == 0 and ci < len(ODD_KINDS):
                data = _encode_odd(img, ODD_KINDS[ci])
                counts["odd"] += 1
            else:
                data = _jpeg(img)
            if k == 1 and ci < len(BROKEN):
                data = list(BROKEN.values())[ci](data)
                counts["broken"] += 1
            _write(tmp / "train" / wnid / name, data)
            counts["train"] += 1
            bar.update()

    # Validation: numbered like ILSVRC2012_val_00000001.JPEG, classes interleaved.
    val_items = [(ci, k) for ci in range(len(CLASSES)) for k in range(config.val_per_class)]
    order = rng.permutation(len(val_items))
    val_labels = []
    for number, pos in enumerate(order, start=1):
        ci, _ = val_items[pos]
        wnid = CLASSES[ci][0]
        name = f"ILSVRC2012_val_{number:08d}.JPEG"
        data = _jpeg(draw_image(ci, rng))
        if number == 1:  # one broken validation file too
            data = data[: len(data) // 4]
            counts["broken"] += 1
        folder = tmp / "val" / wnid if config.val_layout == "folders" else tmp / "val"
        _write(folder / name, data)
        val_labels.append((name, wnid))
        counts["val"] += 1
        bar.update()
    bar.close()
    if config.val_layout == "kaggle":
        _write_kaggle_metadata(tmp, val_labels)
    elif config.val_layout == "devkit":
        _write_devkit(tmp, val_labels)

    doc = {"params": params, "classes": [w for w, _ in CLASSES], "counts": counts}
    _write(tmp / MARKER, (json.dumps(doc, indent=2) + "\n").encode())
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log.info(
        "sample data at %s: %d train + %d val images in %d classes (%d odd kinds, %d broken on purpose); val layout %s",
        out,
        counts["train"],
        counts["val"],
        len(CLASSES),
        counts["odd"],
        counts["broken"],
        config.val_layout,
    )
    return doc


def _write_kaggle_metadata(root: Path, val_labels: list[tuple[str, str]]) -> None:
    from pipeline.classes import bundled_names

    names = bundled_names()
    rows = ["ImageId,PredictionString"]
    for name, wnid in val_labels:
        rows.append(f"{name.split('.')[0]},{wnid} 10 10 100 100 {wnid} 20 20 120 120")
    _write(root / "LOC_val_solution.csv", ("\n".join(rows) + "\n").encode())
    # Kaggle's mapping lists all 1000 classes in sorted order.
    _write(root / "LOC_synset_mapping.txt", "".join(f"{w} {n}\n" for w, n in sorted(names.items())).encode())


def devkit_ids() -> dict[str, int]:
    """The sample devkit's ILSVRC2012_IDs: deliberately NOT in sorted-wnid order (reversed),
    as in the real devkit, so a reader that assumes sorted order gets every label wrong."""
    return {wnid: len(CLASSES) - i for i, (wnid, _) in enumerate(CLASSES)}


def _write_devkit(root: Path, val_labels: list[tuple[str, str]]) -> None:
    from scipy.io import savemat

    ids = devkit_ids()
    data = root / "ILSVRC2012_devkit_t12" / "data"
    _write(data / "ILSVRC2012_validation_ground_truth.txt", "".join(f"{ids[w]}\n" for _, w in val_labels).encode())
    fields = [
        "ILSVRC2012_ID",
        "WNID",
        "words",
        "gloss",
        "num_children",
        "children",
        "wordnet_height",
        "num_train_images",
    ]
    leaves = [(ids[w], w, 0) for w, _ in CLASSES]
    inner = [(len(CLASSES) + 1, "n00001740", 2), (len(CLASSES) + 2, "n00002684", 3)]  # entity, object
    entries = sorted(leaves, key=lambda e: e[0]) + inner
    synsets = np.zeros((len(entries), 1), dtype=[(f, "O") for f in fields])
    for row, (ilsvrc_id, wnid, children) in enumerate(entries):
        synsets[row, 0] = (
            np.array([[ilsvrc_id]], dtype=np.uint16),
            np.array([wnid]),
            np.array([wnid]),
            np.array([""]),
            np.array([[children]], dtype=np.uint8),
            np.zeros((1, children), dtype=np.uint16),
            np.array([[0]], dtype=np.uint8),
            np.array([[1300 if children == 0 else 0]], dtype=np.uint16),
        )
    buf = io.BytesIO()
    savemat(buf, {"synsets": synsets})
    _write(data / "meta.mat", buf.getvalue())


@exits_cleanly_when_full(log)
def main(argv: list[str] | None = None) -> int:
    setup_logging()
    p = argparse.ArgumentParser(
        prog="python -m pipeline.sample",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = SampleConfig(out=Path("."))
    p.add_argument("--out", type=Path, required=True, help="folder to write the raw sample tree into")
    p.add_argument("--train-per-class", type=int, default=d.train_per_class)
    p.add_argument("--val-per-class", type=int, default=d.val_per_class)
    p.add_argument(
        "--val-layout",
        choices=VAL_LAYOUTS,
        default=d.val_layout,
        help="folders: val/<wnid>/*; kaggle: flat val/ + LOC_val_solution.csv; "
        "devkit: flat val/ + ILSVRC2012_validation_ground_truth.txt + meta.mat",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    a = p.parse_args(argv)
    if a.train_per_class < 2 or a.val_per_class < 1:
        p.error("--train-per-class must be >= 2 and --val-per-class >= 1")
    try:
        generate(
            SampleConfig(
                out=a.out,
                train_per_class=a.train_per_class,
                val_per_class=a.val_per_class,
                val_layout=a.val_layout,
                seed=a.seed,
            )
        )
    except (FileExistsError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
