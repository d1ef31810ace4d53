"""The memory one image will cost to decode, estimated from its header alone.

A few KB of PNG can describe a 40-megapixel 16-bit image whose decode needs about 1 GB;
`max_pixels` alone does not see that. `decode_cost` reads only what Pillow parsed from the
header (format, mode, size, frames, transparency) and returns the peak bytes that
`pipeline.preprocess.prepare_image` and the serving crops will need, so a request over
`Settings.max_decode_bytes` is refused (413) before a pixel is decoded.

Bytes per source pixel by mode were measured on this project's preprocessing (peak RSS
above the process's fixed overhead, 4-megapixel images, Pillow 13: benchmarks/decode_memory.py,
docs/benchmarks.md) and rounded up: the estimate is an upper bound, not a guess in the middle.
"""

from __future__ import annotations

from PIL import Image

from pipeline.preprocess import OUTPUT_SIZE

# Working bytes per pixel of the decoded source, by Pillow mode (benchmarks/decode_memory.py,
# 2000x2000: 1 6.7, L 6.6, P 6.7, RGB 5.7, P+transparency 12.7, LA 15.7, RGBA 15.7, I;16 21.7,
# RGB WebP 15.6).
_BYTES_PER_PIXEL = {
    "1": 8, "L": 8, "P": 8, "RGB": 8, "YCbCr": 8, "LAB": 8, "HSV": 8,
    "CMYK": 10,  # 4 bytes decoded, then RGB
    "LA": 20, "La": 20, "PA": 20, "RGBA": 20, "RGBa": 20, "RGBX": 20,  # composited on a background
    "I;16": 24, "I;16B": 24, "I;16L": 24, "I;16N": 24,  # 16-bit: scaled to 8 bits through wide temporaries
    "I": 32, "F": 32,
}
_UNKNOWN_MODE = 32
_ALPHA = 20  # a palette or greyscale image with a transparent colour is composited like RGBA
# Formats whose decoder holds its own full-size buffer besides Pillow's (measured: WebP 15.6 B/px).
_FORMAT_EXTRA = {"WEBP": 16}


def _jpeg_scale(width: int, height: int, size: int) -> int:
    """The DCT scale libjpeg decodes a JPEG at in contract 3's preprocessing: the largest k in
    (8, 4, 2) that keeps the shorter side >= size (else 1). Arithmetic on the header only."""
    shorter = min(width, height)
    return next((k for k in (8, 4, 2) if -(-shorter // k) >= size), 1)


def decode_cost(img: Image.Image, size: int = OUTPUT_SIZE) -> int:
    """Estimated peak bytes to decode `img` (opened, header parsed, not loaded) to `size`."""
    width, height = img.size
    mode = img.mode
    per_pixel = _BYTES_PER_PIXEL.get(mode, _UNKNOWN_MODE)
    if "transparency" in img.info:
        per_pixel = max(per_pixel, _ALPHA)
    if img.format == "JPEG":
        # libjpeg decodes at 1/k of the size (DCT scaling), whatever the mode.
        k = _jpeg_scale(width, height, size)
        width, height = -(-width // k), -(-height // k)
    per_pixel += _FORMAT_EXTRA.get(img.format or "", 0)
    frames = getattr(img, "n_frames", 1) or 1
    if frames > 1:  # decoders of animations keep the previous frame for disposal/blending
        per_pixel *= 2
    return width * height * per_pixel
