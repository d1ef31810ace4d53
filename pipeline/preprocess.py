"""The one preprocessing definition (contract 3): any image -> 256x256 RGB.

The paper's only preprocessing: rescale so the SHORTER side is 256, crop the central
256x256 patch. The sharder calls `prepare_image` for every ImageNet file and serving calls
the same function on every uploaded image, so training and serving see the same pixels.

Where the time goes, and the levers used (measured in benchmarks/shard.py):
- Pillow reads only the header first: format, size, EXIF orientation, and the bomb check
  before any pixel is allocated.
- Plain JPEGs (nearly all of ImageNet) are decoded by libjpeg-turbo through simplejpeg at
  the smallest power-of-two DCT scale (1/2, 1/4, 1/8) that keeps the shorter side >= 256,
  so a 2000x1500 photo is decoded as 500x375, never as 3 MP. (Non-power-of-two n/8 scales
  use a slower IDCT and cost more than they save.) Everything else (PNG, CMYK, 16-bit,
  palette, ...) goes through Pillow.
- Only the central square is resampled, with OpenCV's cubic resize (Pillow's resampler is
  ~6x slower here); DCT scaling has already brought the ratio under 2, where cubic
  interpolation needs no anti-alias prefilter.
- EXIF orientation is applied to the 256x256 result: flips and quarter turns commute with a
  centred square crop and a square resize, so the answer is the same and 10x cheaper.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

cv2.setNumThreads(1)  # one image per call; parallelism comes from worker processes

OUTPUT_SIZE = 256
DEFAULT_JPEG_QUALITY = 90
# Pillow's own default bomb limit (~89 MP, 0.25 GiB as RGB). The largest ImageNet
# training image is ~12 MP; anything far bigger is a bomb or not a photograph.
DEFAULT_MAX_PIXELS = 89_478_485
# Transparent pixels are composited onto this colour: deterministic, unlike whatever
# colour happens to be stored under alpha=0.
ALPHA_BACKGROUND = (255, 255, 255)


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
            # We enforce our own limit below; keep Pillow's global one from warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
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


# EXIF Orientation tag -> the Pillow transpose that shows the image upright (as exif_transpose).
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
EXIF_ORIENTATION_TAG = 0x0112


def _dct_scale(width: int, height: int, size: int) -> int:
    """Largest k in (8, 4, 2, 1) with the shorter side still >= size after decoding at 1/k."""
    shorter = min(width, height)
    for k in (8, 4, 2):
        if -(-shorter // k) >= size:
            return k
    return 1


def _decode_jpeg_fast(data: bytes, img: Image.Image, size: int) -> np.ndarray | None:
    """libjpeg-turbo decode at a DCT scale; None when the file needs Pillow's care (CMYK,
    or a stream with recoverable errors, which Pillow judges: lenient on stray bytes,
    strict on truncation)."""
    if img.format != "JPEG" or img.mode not in ("RGB", "L"):
        return None
    k = _dct_scale(*img.size, size)
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=-(-img.size[0] // k),
                                      min_height=-(-img.size[1] // k), strict=True)
    except ValueError:
        return None


def _decode_with_pillow(img: Image.Image, size: int) -> np.ndarray:
    if img.format == "JPEG":  # CMYK and friends still get DCT scaling through draft()
        k = _dct_scale(*img.size, size)
        if k > 1:
            img.draft(img.mode, (-(-img.size[0] // k), -(-img.size[1] // k)))
    img.load()  # decode now, so a truncated/corrupt file fails here with its reason
    return np.asarray(_to_rgb(img), dtype=np.uint8)


def center_square(pixels: np.ndarray) -> np.ndarray:
    """The central shorter-side x shorter-side square (a view, no copy)."""
    height, width = pixels.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return pixels[top:top + side, left:left + side]


def resize_square(square: np.ndarray, size: int) -> np.ndarray:
    if square.shape[0] == size:
        return np.ascontiguousarray(square)
    return cv2.resize(np.ascontiguousarray(square), (size, size), interpolation=cv2.INTER_CUBIC)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Every mode ImageNet really has (and a few more) -> 8-bit RGB."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit greyscale: Pillow's convert("L") clips at 255 instead of scaling.
        arr = np.asarray(img).astype(np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        top = 1.0 if arr.max() <= 1.0 else 255.0
        arr = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        mode == "P" and "transparency" in img.info
    ) or (mode in ("L", "RGB") and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    # L, 1, P, CMYK (Adobe-inverted CMYK is handled by Pillow's decoder), YCbCr, LAB, HSV.
    return img.convert("RGB")


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
    (empty, not an image, truncated, corrupt, too many pixels, refused format).
    """
    img = open_image(data, max_pixels=max_pixels, allowed_formats=allowed_formats,
                     allow_animated=allow_animated)
    fmt = img.format or "unknown"
    source_size = img.size
    try:
        orientation = img.getexif().get(EXIF_ORIENTATION_TAG)
    except Exception:  # a broken EXIF block is not a reason to drop a photo
        orientation = None
    try:
        decoded = _decode_jpeg_fast(data, img, size)
        if decoded is None:
            decoded = _decode_with_pillow(img, size)
        pixels = resize_square(center_square(decoded), size)
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, cv2.error) as exc:
        # Pillow reports truncation and corrupt streams as OSError/SyntaxError/ValueError.
        raise ImageError(f"corrupt or truncated image data ({fmt}): {exc}") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"decompression bomb: {exc}", kind="too_large") from None
    if orientation in _ORIENTATION:
        pixels = np.asarray(Image.fromarray(pixels).transpose(_ORIENTATION[orientation]))
    if pixels.shape != (size, size, 3):  # defensive: never let a bad array into a shard
        raise ImageError(f"unexpected decoded shape {pixels.shape}")
    return PreparedImage(pixels=pixels, source_format=fmt, source_size=source_size)


def encode_jpeg(pixels: np.ndarray, quality: int = DEFAULT_JPEG_QUALITY) -> bytes:
    """Re-encode the prepared pixels. Baseline JPEG with 4:2:0 chroma, no metadata, so
    the same pixels always give the same bytes (the shard set is byte-reproducible)."""
    return simplejpeg.encode_jpeg(np.ascontiguousarray(pixels), quality=quality, colorspace="RGB",
                                  colorsubsampling="420")
