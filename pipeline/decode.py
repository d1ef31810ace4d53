"""Strict decoding: the whole image, or an exception. Never a partial or garbage image.

Policy (contract 3; the sharder skips and reports what fails here, serving answers 400):
- JPEG (and MPO, a JPEG with extra pictures after it) is decoded only by libjpeg-turbo
  (simplejpeg), in strict mode, at the DCT scale that keeps the shorter side >= size. The
  policy follows libjpeg's own line between what it skips and what it loses:
  kept, with a note (`decode_jpeg` returns them; the sharder records them in the manifest):
  junk between header segments ("N extraneous bytes before marker 0xdb", 0xc4, 0xc0, 0xda,
  ...), junk after a scan's last block (before the next table or scan of a progressive
  file, or before the end marker 0xd9, which some ImageNet files carry), and data after the
  end-of-image marker. Such bytes hold no image data; they are cut (pipeline.jpeg) and
  the rest is decoded strictly again, so a kept image has decoded with no warning at all
  and its pixels are those of the same file without the junk.
  rejected: every other warning: junk before a restart marker (0xd0-0xd7: the decoder
  lost its place inside a scan and skipped image data to find the marker), a file cut
  short anywhere (even by only its end marker), a bad Huffman code, damaged markers.
  Pillow's JPEG decoder, which silently fills what it cannot decode, is never used for
  pixels.
- PNG: every chunk's CRC is checked and the file must reach its IEND chunk before Pillow
  decodes it, so a damaged or cut-short compressed stream is caught even where zlib would not
  notice.
- Everything else is decoded by Pillow, once: `load()` either completes or raises (Pillow
  flags truncation and broken compressed streams); its error is never swallowed, and the image
  is never loaded a second time (a second `load()` after a failed one returns a half-filled
  image without error).
- Formats without checksums (BMP, uncompressed TIFF, GIF and WebP pixel data, and JPEG's
  entropy-coded data where the damage happens to decode) cannot reveal changed bytes that
  keep their structure valid; nothing can tell those pixels from real ones. A damaged scan
  that decodes and merely ends early leaves bytes before the next marker exactly as junk
  after a scan does: libjpeg cannot tell the two apart, and neither can this policy.

`decode_jpeg` returns the centre square as uint8 RGB at the DCT scale, and its notes; `pillow_square`
decodes, shrinks (pipeline.resample) and converts every other format to size x size uint8
RGB. Modes are converted where it is cheapest and exact: 16-bit, 32-bit and float greyscale
are resized in their own depth and scaled to 0..255 (not clipped, as Pillow's convert("L")
would) only at 256x256; no full-size float copy is ever made.
"""

from __future__ import annotations

import re
import zlib

import numpy as np
import simplejpeg
from PIL import Image

from pipeline.jpeg import EOI, RST, cut, junk_note, tidy, trailing_note
from pipeline.resample import centre_square, resize_pil_square

ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels are composited onto white: deterministic
JPEG_FORMATS = ("JPEG", "MPO")
# libjpeg's warning for bytes it skipped to find a marker.
_EXTRANEOUS = re.compile(r"(\d+) extraneous bytes before marker 0x([0-9a-f]{2})", re.IGNORECASE)
# Decodes spent finding and cutting junk at the end of scans, beyond the first (a
# progressive photograph has about 10 scans; none has junk after more than one or two).
MAX_EXTRA_DECODES = 16
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Modes Pillow's resize filters as they are; every other mode is converted first.
FILTERABLE_MODES = ("L", "LA", "RGB", "RGBA", "I;16", "I;16B", "I;16L", "I;16N", "I", "F")


class DecodeError(ValueError):
    """The data cannot be decoded in full; the message says why (safe to show a user)."""


def dct_scale(width: int, height: int, size: int) -> int:
    """Largest k in (8, 4, 2, 1) with the shorter side still >= size after decoding at 1/k.
    (libjpeg-turbo's other n/8 scales have no SIMD IDCT and cost more than they save.)"""
    shorter = min(width, height)
    for k in (8, 4, 2):
        if -(-shorter // k) >= size:
            return k
    return 1


def decode_jpeg(data: bytes, img: Image.Image, size: int) -> tuple[np.ndarray, tuple[str, ...]]:
    """The centre square of a JPEG as uint8 RGB, decoded by libjpeg-turbo at a DCT scale,
    and the notes on stray bytes that were ignored (the policy above)."""
    k = dct_scale(*img.size, size)
    cmyk = img.mode == "CMYK"  # CMYK and YCCK; libjpeg-turbo gives CMYK for both
    kw = dict(colorspace="CMYK" if cmyk else "RGB", min_width=-(-img.size[0] // k), min_height=-(-img.size[1] // k))
    pixels, notes = _strict_without_junk(data, img.format, kw)
    left, top, side = centre_square(pixels.shape[1], pixels.shape[0])
    square = pixels[top : top + side, left : left + side]
    if cmyk:  # Adobe-inverted, as Pillow reads it ("CMYK;I"), then Pillow's CMYK -> RGB
        inverted = np.ascontiguousarray(255 - square)
        square = np.asarray(Image.frombytes("CMYK", (side, side), inverted.tobytes()).convert("RGB"))
    return square, notes


def _strict_without_junk(data: bytes, fmt: str | None, kw: dict) -> tuple[np.ndarray, tuple[str, ...]]:
    """A strict decode of the file; where it warns, the same with the junk between segments
    and after EOI cut, and the junk at the end of any scan cut as libjpeg reports it. Any
    other warning is a DecodeError."""
    try:
        pixels = simplejpeg.decode_jpeg(data, strict=True, **kw)
    except ValueError as exc:
        first = exc
    else:  # nearly every file: walked only if something follows its end marker
        tidied = tidy(data) if not data.endswith(b"\xff\xd9") and fmt != "MPO" else None
        return pixels, (trailing_note(tidied.trailing),) if tidied is not None and tidied.trailing else ()
    tidied = tidy(data)
    if tidied is None:  # not walkable (cut short, a broken segment): libjpeg's verdict stands
        raise DecodeError(f"corrupt or truncated JPEG data: {first}") from None
    notes = list(tidied.notes)
    if tidied.trailing and fmt != "MPO":  # an MPO's other pictures follow its first EOI
        notes.append(trailing_note(tidied.trailing))
    stream, scan_ends = tidied.data, tidied.scan_ends
    budget = [MAX_EXTRA_DECODES]  # a crafted file with many scans cannot buy many decodes
    while True:
        try:
            return simplejpeg.decode_jpeg(stream, strict=True, **kw), tuple(notes)
        except ValueError as exc:
            found = _EXTRANEOUS.search(str(exc))
            n, code = (int(found[1]), int(found[2], 16)) if found else (0, 0)
            scan = None
            if found and code not in RST and budget[0] > 0:
                budget[0] -= 1  # the decode after the cut
                scan = _scan_with_junk(stream, scan_ends, n, code, kw, budget)
            if scan is None:
                raise DecodeError(f"corrupt or truncated JPEG data: {exc}") from None
            stream, scan_ends = cut(stream, scan_ends, scan, n)
            notes.append(junk_note(n, code))


def _scan_with_junk(
    stream: bytes, scan_ends: tuple[tuple[int, int], ...], n: int, code: int, kw: dict, budget: list[int]
) -> int | None:
    """Which scan ends in the `n` junk bytes that libjpeg skipped before marker `code`:
    the first scan followed by that marker whose data, ended there, leaves exactly those
    bytes over (libjpeg reads scans in file order and stops at the first warning)."""
    for i, (end, follower) in enumerate(scan_ends):
        if follower != code:
            continue
        if code == EOI and end + 2 == len(stream):  # the last scan, then EOI: the decode just made says so
            return i
        if budget[0] <= 0:
            return None
        budget[0] -= 1
        try:
            simplejpeg.decode_jpeg(stream[:end] + b"\xff\xd9", strict=True, **kw)
        except ValueError as exc:
            found = _EXTRANEOUS.search(str(exc))
            if found and int(found[1]) == n and int(found[2], 16) == EOI:
                return i
    return None


def check_png(data: bytes) -> None:
    """Every chunk complete and its CRC right, up to and including IEND."""
    view = memoryview(data)
    pos, end_of_data = len(PNG_SIGNATURE), len(data)
    while True:
        if pos + 12 > end_of_data:
            raise DecodeError(f"truncated PNG: the file ends at byte {end_of_data} before its IEND chunk")
        length = int.from_bytes(view[pos : pos + 4], "big")
        kind = bytes(view[pos + 4 : pos + 8])
        crc_at = pos + 8 + length
        if crc_at + 4 > end_of_data:
            raise DecodeError(
                f"truncated PNG: chunk {kind.decode('latin-1')!r} at byte {pos} runs past the "
                f"end of the file ({end_of_data} bytes)"
            )
        if zlib.crc32(view[pos + 4 : crc_at]) != int.from_bytes(view[crc_at : crc_at + 4], "big"):
            raise DecodeError(f"corrupt PNG: CRC mismatch in chunk {kind.decode('latin-1')!r} at byte {pos}")
        if kind == b"IEND":
            return
        pos = crc_at + 4


def _filterable(img: Image.Image) -> Image.Image:
    """A mode Pillow's resize filters without loss of meaning ("1" and "P" it would only
    sample; CMYK, YCbCr, LAB, HSV are converted to RGB); transparency kept as alpha."""
    mode = img.mode
    if "transparency" in img.info and mode in ("P", "L", "RGB"):
        return img.convert("RGBA")
    if mode in FILTERABLE_MODES:
        return img
    if mode in ("La", "RGBa", "PA"):
        return img.convert("RGBA")
    if mode == "1":
        return img.convert("L")
    return img.convert("RGB")  # P, CMYK (TIFF), YCbCr, LAB, HSV


def _peak(img: Image.Image) -> float:
    """White for 16/32-bit integer and float greyscale (of the whole image, before resizing)."""
    if img.mode.startswith("I;16"):
        return 65535.0
    high = img.getextrema()[1]
    assert isinstance(high, (int, float))  # one band: (min, max)
    if img.mode == "I":
        return 65535.0 if high > 255 else 255.0
    return 1.0 if high <= 1.0 else 255.0  # F


def _rgb8(small: Image.Image, peak: float | None) -> np.ndarray:
    """A size x size image in a filterable mode -> uint8 RGB."""
    mode = small.mode
    if mode in ("RGBA", "LA"):  # transparent pixels onto ALPHA_BACKGROUND
        rgba = small.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    if mode in ("RGB", "L"):
        return np.asarray(small.convert("RGB"))
    values = np.asarray(small)  # size x size: 16/32-bit integers or float32
    assert peak is not None  # these modes come with theirs (_peak)
    if mode == "F":
        grey = np.clip(np.rint(np.nan_to_num(values) * np.float32(255.0 / peak)), 0, 255).astype(np.uint8)
    else:  # round(v * 255 / peak) in integers
        top = int(peak)
        v = np.clip(values.astype(np.int64), 0, top)
        grey = ((v * 255 + top // 2) // top).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def pillow_square(data: bytes, img: Image.Image, size: int) -> np.ndarray:
    """Any non-JPEG image -> its centre square at size x size, uint8 RGB."""
    if img.format == "PNG":
        check_png(data)
    img.load()  # the whole image, or an exception; never retried
    filterable = _filterable(img)
    peak = _peak(filterable) if filterable.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F") else None
    return _rgb8(resize_pil_square(filterable, size), peak)
