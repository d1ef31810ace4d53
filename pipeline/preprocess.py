"""The one preprocessing definition (contract 3): any image -> 256x256 RGB.

The paper's only preprocessing: rescale so the SHORTER side is 256, crop the central
256x256 patch. The sharder calls `prepare_image` for every ImageNet file and serving calls
the same function on every uploaded image, so training and serving see the same pixels.

Steps, and where each lives:
- `open_image` reads only the header: format (from the content, never the file name), size,
  and the decompression-bomb check before any pixel is allocated. `read_header` reports the
  same facts (and the frame count and decode memory) for callers that budget work.
- pipeline.decode decodes strictly (the whole image or ImageError: its docstring has the
  policy per format, among them the one JPEG policy: stray bytes that hold no image data
  are ignored and noted, anything that loses image data rejects the file). Plain JPEGs (nearly all of ImageNet) go through libjpeg-turbo at the
  smallest power-of-two DCT scale that keeps the shorter side >= 256, so a 2000x1500 photo is
  decoded as 500x375, never as 3 MP; the DCT scaling is itself an anti-aliased reduction.
  Everything else goes through Pillow, and every mode ends as 8-bit RGB (16-bit and float
  greyscale scaled to 0..255, not clipped; transparency composited onto white).
- pipeline.resample shrinks only the central square, anti-aliased at every ratio (a
  Lanczos-3 low-pass widened by the ratio, then a cubic interpolation).
- EXIF orientation, read after the decode succeeded, is applied to the 256x256 result:
  flips and quarter turns commute with a centred square crop and a square resize, so the
  answer is the same and 10x cheaper.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

from pipeline.decode import JPEG_FORMATS, DecodeError, dct_scale, decode_jpeg, pillow_square
from pipeline.resample import resize_square

OUTPUT_SIZE = 256
DEFAULT_JPEG_QUALITY = 90
# Pillow's own default bomb limit (~89 MP, 0.25 GiB as RGB). The largest ImageNet
# training image is ~12 MP; anything far bigger is a bomb or not a photograph.
DEFAULT_MAX_PIXELS = 89_478_485
# Bumped whenever the pixels prepare_image returns for the same bytes change; it is part of
# every shard's fingerprint, so a rerun over an older shard set rewrites its shards.
# 3: JPEGs with junk between segments, after a scan or after the end marker are kept (they
# were skipped); the pixels of every image version 2 kept are unchanged.
PREPROCESS_VERSION = 3  # 2: strict decoding, anti-aliased resampling


class ImageError(ValueError):
    """An input that is not a usable image. `reason` is short and safe to show a user."""

    def __init__(self, reason: str, kind: str = "invalid_image"):
        super().__init__(reason)
        self.reason = reason
        self.kind = kind  # machine-readable: invalid_image, too_large, unsupported_format


@dataclass(frozen=True)
class PreparedImage:
    """The 256x256 RGB pixels, and facts about the source useful in reports."""

    pixels: np.ndarray  # uint8, (256, 256, 3), RGB
    source_format: str  # JPEG, PNG, ... as Pillow identified the content
    source_size: tuple[int, int]  # (width, height) before EXIF rotation
    # Harmless oddities ignored on the way (stray bytes between JPEG segments or after its
    # end marker: pipeline.decode's policy); the sharder records them in the manifest.
    notes: tuple[str, ...] = ()


def open_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allowed_formats: frozenset[str] | None = None,
    allow_animated: bool = True,
) -> Image.Image:
    """Identify `data` from its content (never its file name) and check it before decoding.

    Only the header has been read when this returns; the size check therefore stops a
    decompression bomb before a single pixel is allocated.
    """
    if not data:
        raise ImageError("empty file")
    try:
        with warnings.catch_warnings():
            # We enforce our own pixel limit below, and a broken metadata block is reported by
            # the decode or not at all: keep Pillow's warnings out of the sharder's log.
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError("not an image (content matches no known image format)") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"decompression bomb: {exc}", kind="too_large") from None
    except Exception as exc:  # Pillow raises many types on malformed headers
        raise ImageError(f"unreadable image header: {exc}") from None
    fmt = img.format or "unknown"
    if allowed_formats is not None and fmt not in allowed_formats:
        raise ImageError(
            f"unsupported image format {fmt}; accepted: {', '.join(sorted(allowed_formats))}",
            kind="unsupported_format",
        )
    if not allow_animated and getattr(img, "n_frames", 1) > 1:
        raise ImageError("animated or multi-frame images are not accepted", kind="unsupported_format")
    width, height = img.size
    if width < 1 or height < 1:
        raise ImageError(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(
            f"image is {width}x{height} = {width * height:,} pixels, over the limit of "
            f"{max_pixels:,} (decompression bomb guard)",
            kind="too_large",
        )
    return img


# Bytes per pixel of Pillow's in-memory image for each mode (RGB is stored as 4 bytes).
_PILLOW_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
_MODE_BITS = {"1": 1, "I;16": 16, "I;16B": 16, "I;16L": 16, "I;16N": 16, "I": 32, "F": 32}


@dataclass(frozen=True)
class ImageHeader:
    """What the header says, before any pixel is decoded (`read_header`)."""

    format: str
    width: int
    height: int
    mode: str  # Pillow's mode: RGB, L, P, CMYK, I;16, ...
    bits: int  # per sample, as decoded (Pillow reads 16-bit RGB PNGs as 8-bit RGB)
    frames: int
    transparency: bool  # a transparent colour in a P, L or RGB image (composited as RGBA)
    decode_bytes: int  # the decoded pixels prepare_image holds at once (working copies aside)


def header_of(img: Image.Image, size: int = OUTPUT_SIZE) -> ImageHeader:
    """The header facts of an image `open_image` returned (it has not been decoded)."""
    width, height = img.size
    fmt = img.format or "unknown"
    if fmt in JPEG_FORMATS:  # libjpeg-turbo decodes at a DCT scale, 3 or 4 bytes a pixel
        k = dct_scale(width, height, size)
        decode_bytes = -(-width // k) * -(-height // k) * (4 if img.mode == "CMYK" else 3)
    else:
        decode_bytes = width * height * _PILLOW_PIXEL_BYTES.get(img.mode, 4)
    return ImageHeader(
        format=fmt,
        width=width,
        height=height,
        mode=img.mode,
        bits=_MODE_BITS.get(img.mode, 8),
        frames=int(getattr(img, "n_frames", 1)),
        transparency="transparency" in img.info,
        decode_bytes=decode_bytes,
    )


def read_header(data: bytes, *, size: int = OUTPUT_SIZE, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageHeader:
    """Format, size, mode, bit depth, frame count and decode memory of `data`, from its
    header alone (raises ImageError as `open_image` does). For a caller that budgets decode
    work before calling `prepare_image`. Counting a GIF's frames walks the file's frame
    headers (no pixel is decoded); the other formats state it in their header."""
    return header_of(open_image(data, max_pixels=max_pixels), size)


# EXIF Orientation tag -> the Pillow transpose that shows the image upright (as exif_transpose).
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
EXIF_ORIENTATION_TAG = 0x0112


def _orientation(img: Image.Image) -> int | None:
    """The EXIF orientation. Called only after the pixels decoded in full (for a PNG,
    getexif() would otherwise load the pixels itself). A broken EXIF block leaves the
    orientation unknown; the pixels are whole, so the image is kept as stored."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns "Corrupt EXIF data"
            return img.getexif().get(EXIF_ORIENTATION_TAG)
    except Exception:
        return None


def prepare_image(
    data: bytes,
    *,
    size: int = OUTPUT_SIZE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allowed_formats: frozenset[str] | None = None,
    allow_animated: bool = True,
) -> PreparedImage:
    """Bytes of any image -> the paper's 256x256 RGB centre crop (contract 3).

    EXIF orientation applied; converted to RGB from any mode; shorter side scaled to
    `size` and the central square kept. Raises ImageError for anything unusable
    (empty, not an image, truncated, corrupt, too many pixels, refused format); a JPEG with
    stray bytes that hold no image data is kept, and `notes` says what was ignored.
    """
    img = open_image(data, max_pixels=max_pixels, allowed_formats=allowed_formats, allow_animated=allow_animated)
    fmt = img.format or "unknown"
    source_size = img.size
    notes: tuple[str, ...] = ()
    try:
        if fmt in JPEG_FORMATS:
            square, notes = decode_jpeg(data, img, size)
            pixels = resize_square(square, size)
        else:
            pixels = pillow_square(data, img, size)
    except DecodeError as exc:
        raise ImageError(str(exc)) from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"decompression bomb: {exc}", kind="too_large") from None
    except (OSError, SyntaxError, ValueError, EOFError, cv2.error) as exc:
        # Pillow reports truncation and corrupt streams as OSError/SyntaxError/ValueError.
        raise ImageError(f"corrupt or truncated image data ({fmt}): {exc}") from None
    orientation = _orientation(img)
    if orientation in _ORIENTATION:
        pixels = np.asarray(Image.fromarray(pixels).transpose(_ORIENTATION[orientation]))
    if pixels.shape != (size, size, 3) or pixels.dtype != np.uint8:  # never let a bad array into a shard
        raise ImageError(f"unexpected decoded array {pixels.dtype} {pixels.shape}")
    return PreparedImage(pixels=pixels, source_format=fmt, source_size=source_size, notes=notes)


def encode_jpeg(pixels: np.ndarray, quality: int = DEFAULT_JPEG_QUALITY) -> bytes:
    """Re-encode the prepared pixels. Baseline JPEG with 4:2:0 chroma, no metadata, so
    the same pixels always give the same bytes (the shard set is byte-reproducible)."""
    return simplejpeg.encode_jpeg(
        np.ascontiguousarray(pixels), quality=quality, colorspace="RGB", colorsubsampling="420"
    )
