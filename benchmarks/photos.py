"""The benchmarks' photographs at the sizes they need."""

from __future__ import annotations

import io

from PIL import Image

# ImageNet's typical training image: Flickr's 500 px "medium" size, most of them 4:3.
IMAGENET_SIZE = (500, 375)


def resized(data: bytes, max_side: int) -> bytes:
    """A photo re-encoded with its longer side `max_side` (q90, as Flickr JPEGs were)."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    s = max_side / max(img.size)
    buf = io.BytesIO()
    img.resize((round(img.size[0] * s), round(img.size[1] * s)), Image.Resampling.LANCZOS).save(
        buf, format="JPEG", quality=90
    )
    return buf.getvalue()


def cut(data: bytes, size: tuple[int, int] = IMAGENET_SIZE) -> bytes:
    """A photo cut to exactly `size` (landscape) or its transpose (portrait photos): the
    central box of that aspect ratio, Lanczos-resized, re-encoded at q90 4:2:0 (Pillow's
    default), as ImageNet's 500x375 and 375x500 Flickr JPEGs are."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    width, height = img.size
    w, h = size if width >= height else size[::-1]
    if width * h > height * w:  # wider than the target: keep the full height
        cw = round(height * w / h)
        box = ((width - cw) // 2, 0, (width - cw) // 2 + cw, height)
    else:
        ch = round(width * h / w)
        box = (0, (height - ch) // 2, width, (height - ch) // 2 + ch)
    buf = io.BytesIO()
    img.resize((w, h), Image.Resampling.LANCZOS, box=box).save(buf, format="JPEG", quality=90)
    return buf.getvalue()
