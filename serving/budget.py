"""The memory one image will cost to decode, estimated from its header alone.

A few KB of PNG can describe a 40-megapixel 16-bit image; `max_pixels` alone does not say
what decoding it costs. `decode_cost` takes the header facts pipeline.preprocess reads
(`read_header`/`header_of`: format, mode, size, frames, transparency; no pixel decoded) and
returns an upper bound of the peak bytes that the shared preprocessing
(`pipeline.preprocess.prepare_image`) and the serving crops will need, so a request over
`Settings.max_decode_bytes` is refused (413) before a pixel is decoded.

Bytes per source pixel by mode were measured on this project's preprocessing (peak RSS
rise over the same kind of image at 300x300, 2000x2000 images, Pillow 13:
benchmarks/decode_memory.py, docs/benchmarks.md) and rounded up with a margin: the estimate
is an upper bound, not a guess in the middle.
"""

from __future__ import annotations

from pipeline.decode import JPEG_FORMATS, dct_scale
from pipeline.preprocess import OUTPUT_SIZE, ImageHeader

# Working bytes per decoded source pixel, by Pillow mode: the measured peak (2000x2000,
# benchmarks/decode_memory.py: L 1.1, 1 2.1, P 5.5, RGB 4.4, P+transparency 9.4, LA and RGBA
# 8.3, I;16 2.1, RGB WebP 15.9 (16.7 at 4000x4000); JPEGs per decoded pixel at their DCT scale: RGB 6.4, CMYK
# 14.4) with a margin of at least a third.
_BYTES_PER_PIXEL = {
    "L": 2,  # 1 byte decoded, resized as it is
    "1": 4,  # 1 byte decoded, converted to L to be filtered
    "P": 8,  # 1 byte decoded, then converted to RGB (4) to be filtered
    "RGB": 8,
    "YCbCr": 8,
    "LAB": 8,
    "HSV": 8,  # 4 bytes decoded (Pillow pads RGB), resized as they are
    "CMYK": 20,  # a CMYK JPEG: 4 bytes decoded, then inverted and converted to RGB
    "LA": 14,
    "La": 14,
    "PA": 14,
    "RGBA": 14,
    "RGBa": 14,
    "RGBX": 14,  # composited on a background
    "I;16": 4,
    "I;16B": 4,
    "I;16L": 4,
    "I;16N": 4,  # 2 bytes decoded, resized in their own depth
    "I": 8,
    "F": 8,  # 4 bytes decoded, resized in their own depth
}
_UNKNOWN_MODE = 16
_ALPHA = 14  # a palette or greyscale image with a transparent colour is composited like RGBA
# Formats whose decoder holds its own full-size buffer besides Pillow's.
_FORMAT_EXTRA = {"WEBP": 16}


def decode_cost(header: ImageHeader, size: int = OUTPUT_SIZE) -> int:
    """Estimated peak bytes to decode the image of `header` to `size` x `size`."""
    width, height = header.width, header.height
    per_pixel = _BYTES_PER_PIXEL.get(header.mode, _UNKNOWN_MODE)
    if header.transparency:
        per_pixel = max(per_pixel, _ALPHA)
    if header.format in JPEG_FORMATS:  # libjpeg decodes at 1/k of the size (DCT scaling)
        k = dct_scale(width, height, size)
        width, height = -(-width // k), -(-height // k)
    per_pixel += _FORMAT_EXTRA.get(header.format, 0)
    if header.frames > 1:  # decoders of animations keep the previous frame for disposal/blending
        per_pixel *= 2
    return width * height * per_pixel
