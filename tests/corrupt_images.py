"""Broken image files, one per corruption kind, made from real ones: the sharder must skip
and report each (tests/pipeline/test_corrupt.py), serving must answer each with a 4xx
(tests/serving/test_corrupt.py).

Sources (tests/data/pillow/, from Pillow's own test images): a real photograph as JPEG and
PNG (re-encoded by Pillow as GIF, TIFF, WebP and BMP), plus three files Pillow ships broken.
Each kind is applied at several byte offsets: inside the header, in the first scan (the
first compressed image data), in the middle, and in the last bytes.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

DATA = Path(__file__).resolve().parent / "data" / "pillow"
SECTOR = 512  # a disk sector of garbage: what a bad copy or a failing disk leaves behind


@dataclass(frozen=True)
class Corrupt:
    name: str  # kind@where, also the file stem in a raw tree
    fmt: str  # the format the intact file had (JPEG, PNG, GIF, TIFF, WEBP, BMP)
    data: bytes
    reason: str  # a substring of the ImageError reason ("" = any reason)

    @property
    def content_type(self) -> str:
        return f"image/{self.fmt.lower()}"

    @property
    def suffix(self) -> str:
        return {"JPEG": ".JPEG", "PNG": ".png", "GIF": ".gif", "TIFF": ".tif", "WEBP": ".webp", "BMP": ".bmp"}[self.fmt]


def photo(fmt: str) -> bytes:
    """The real photograph in `fmt`: Pillow's files for JPEG and PNG, re-encoded otherwise."""
    if fmt in ("JPEG", "PNG"):
        return (DATA / ("hopper.jpg" if fmt == "JPEG" else "hopper.png")).read_bytes()
    img = Image.open(DATA / "hopper.png").convert("RGB")
    buf = io.BytesIO()
    kw = {"TIFF": {"compression": "tiff_deflate"}, "WEBP": {"quality": 90}}.get(fmt, {})
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def first_scan(data: bytes, fmt: str) -> int:
    """Offset of the first compressed image data."""
    if fmt == "JPEG":
        sos = data.index(b"\xff\xda")
        return sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")
    if fmt == "PNG":
        return data.index(b"IDAT") + 4
    if fmt == "GIF":  # header, global colour table, extension blocks, image descriptor, LZW data
        pos = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)
        while data[pos] == 0x21:  # extension: label, then sub-blocks until a zero length
            pos += 2
            while data[pos]:
                pos += data[pos] + 1
            pos += 1
        return pos + 10 + (3 << ((data[pos + 9] & 7) + 1) if data[pos + 9] & 0x80 else 0) + 1
    if fmt == "BMP":
        return int.from_bytes(data[10:14], "little")
    if fmt == "TIFF":
        return 8  # Pillow writes the strip right after the 8-byte header
    return 30  # WebP: RIFF header + VP8 chunk header


def offsets(data: bytes, fmt: str) -> dict[str, int]:
    scan = first_scan(data, fmt)
    return {
        "header": min(scan // 2, 40),
        "first-scan": scan + 64,
        "middle": len(data) // 2,
        "last-bytes": len(data) - 4,
    }


def truncated(fmt: str, reason: str) -> list[Corrupt]:
    data = photo(fmt)
    return [
        Corrupt(f"{fmt.lower()}-truncated@{where}", fmt, data[:at], reason if where != "header" else "")
        for where, at in offsets(data, fmt).items()
    ]


def garbage_sector(fmt: str, reason: str, seed: int = 0) -> list[Corrupt]:
    """A sector of random bytes written over the file at each offset (the last one ends
    4 bytes before the end, so the file keeps its length and its end marker)."""
    data = photo(fmt)
    out = []
    for where, at in offsets(data, fmt).items():
        at = min(at, len(data) - 4 - SECTOR) if where == "last-bytes" else at
        junk = np.random.RandomState(seed + at).randint(0, 256, SECTOR, dtype=np.uint8).tobytes()
        broken = data[:at] + junk + data[at + SECTOR :]
        out.append(
            Corrupt(f"{fmt.lower()}-garbage@{where}", fmt, broken[: len(data)], reason if where != "header" else "")
        )
    return out


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_damaged_stream_valid_crcs() -> bytes:
    """The PNG photo with its zlib stream damaged but every CRC recomputed (so only the
    decoder can notice), and an EXIF block before the pixels: the file that used to be
    stored as a half-decoded image (getexif() loaded the pixels, the error was swallowed as
    a broken EXIF block, and a second load returned the partial image)."""
    img = Image.open(DATA / "hopper.png").convert("RGB")
    raw = b"".join(b"\x00" + img.tobytes()[y * 128 * 3 : (y + 1) * 128 * 3] for y in range(128))
    stream = bytearray(zlib.compress(raw, 6))
    stream[len(stream) // 2 : len(stream) // 2 + 16] = b"\xff" * 16  # an invalid deflate block
    exif = Image.Exif()
    exif[0x0112] = 1
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 128, 128, 8, 2, 0, 0, 0))
        + png_chunk(b"eXIf", exif.tobytes())
        + png_chunk(b"IDAT", bytes(stream))
        + png_chunk(b"IEND", b"")
    )


def catalogue() -> list[Corrupt]:
    """Every corruption kind, at every offset where it applies."""
    cases: list[Corrupt] = []
    cases += truncated("JPEG", "Premature end of JPEG file")
    cases += garbage_sector("JPEG", "corrupt or truncated JPEG data")
    cases.append(
        Corrupt(
            "jpeg-progressive-truncated@pillow",
            "JPEG",
            (DATA / "truncated_jpeg.jpg").read_bytes(),
            "Premature end of JPEG file",
        )
    )
    cases += truncated("PNG", "truncated PNG")
    cases += garbage_sector("PNG", "CRC mismatch")
    cases.append(Corrupt("png-damaged-stream@pillow", "PNG", (DATA / "broken_data_stream.png").read_bytes(), ""))
    cases.append(
        Corrupt(
            "png-damaged-stream-valid-crcs@middle",
            "PNG",
            png_damaged_stream_valid_crcs(),
            "corrupt or truncated image data (PNG)",
        )
    )
    cases.append(
        Corrupt(
            "png-truncated-end-chunk@pillow", "PNG", (DATA / "truncated_end_chunk.png").read_bytes(), "truncated PNG"
        )
    )
    cases += truncated("GIF", "image file is truncated")
    cases += [c for c in garbage_sector("GIF", "broken data stream") if "first-scan" in c.name or "middle" in c.name]
    cases += truncated("BMP", "image file is truncated")
    cases += truncated("TIFF", "")  # Pillow writes the directory last: cut anywhere, no longer a TIFF
    cases += truncated("WEBP", "")
    return cases


# -- JPEG oddities: stray bytes that hold no image data (kept, noted) and damage that loses
# image data (skipped), each made from the real photograph (tests/pipeline/test_corrupt.py,
# tests/serving/test_corrupt.py).

JUNK = b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"  # padding a tool left: 16 zero bytes


@dataclass(frozen=True)
class Oddity:
    name: str
    data: bytes
    clean: bytes  # the same file without the oddity (the source it was made from)
    kept: bool  # kept with a note, or skipped
    expect: str  # a substring of the note (kept) or of the ImageError reason (skipped)


def _reencoded(**save) -> bytes:
    """The photograph's own pixels, encoded again (progressive, say): still a real photograph."""
    buf = io.BytesIO()
    Image.open(DATA / "hopper.jpg").save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


def with_restart_markers(interval: int = 4) -> bytes:
    """The photograph with a restart marker every `interval` MCUs (OpenCV's encoder can write them)."""
    import cv2

    bgr = np.asarray(Image.open(DATA / "hopper.jpg").convert("RGB"))[:, :, ::-1]
    ok, out = cv2.imencode(
        ".jpg", np.ascontiguousarray(bgr), [cv2.IMWRITE_JPEG_QUALITY, 90, cv2.IMWRITE_JPEG_RST_INTERVAL, interval]
    )
    assert ok
    return out.tobytes()


def insert(data: bytes, at: int, junk: bytes = JUNK) -> bytes:
    return data[:at] + junk + data[at:]


def first_scan_end(data: bytes) -> int:
    """Where the first scan's entropy-coded data ends: its first marker that is not RSTn."""
    pos = first_scan(data, "JPEG")
    while True:
        pos = data.index(b"\xff", pos)
        if data[pos + 1] not in (0x00, 0xFF, *range(0xD0, 0xD8)):
            return pos
        pos += 1


def _first_warning(candidates, message: str) -> bytes:
    """The first candidate file whose strict decode warns with `message` (a deterministic search
    over a few positions, so that the file shows the kind whatever the encoder's exact bytes)."""
    import simplejpeg

    for data in candidates:
        try:
            simplejpeg.decode_jpeg(data, strict=True)
        except ValueError as exc:
            if message in str(exc):
                return data
    raise AssertionError(f"no candidate warns {message!r}")


def jpeg_oddities() -> list[Oddity]:
    base, progressive, restart = photo("JPEG"), _reencoded(progressive=True), with_restart_markers()
    marker = lambda data, code: data.index(bytes((0xFF, code)))  # noqa: E731
    kept = [
        Oddity(
            f"jpeg-junk-before-{name}",
            insert(base, marker(base, code)),
            base,
            True,
            f"{len(JUNK)} extraneous bytes before marker 0x{code:02x}",
        )
        for name, code in (("dqt", 0xDB), ("sof", 0xC0), ("dht", 0xC4), ("sos", 0xDA))
    ] + [
        Oddity(
            "jpeg-junk-after-a-progressive-scan",
            insert(progressive, first_scan_end(progressive)),
            progressive,
            True,
            "extraneous bytes before marker 0x",
        ),
        Oddity("jpeg-junk-before-eoi", insert(base, len(base) - 2), base, True, "extraneous bytes before marker 0xd9"),
        Oddity(
            "jpeg-data-after-eoi",
            base + JUNK + b"trailer written by some tool",
            base,
            True,
            f"{len(JUNK) + 28} bytes after the end-of-image marker",
        ),
    ]
    rst2, rst3 = marker(restart, 0xD2), marker(restart, 0xD3)
    ecs = first_scan(base, "JPEG")
    skipped = [
        # Bytes inside an interval: the decoder reads them as image data, loses its place and
        # finds the restart marker only by skipping what was left of the interval.
        Oddity(
            "jpeg-junk-inside-a-restart-interval",
            _first_warning(
                (insert(restart, at, bytes(range(1, 41))) for at in range(rst2 + 8, rst3, 4)),
                "extraneous bytes before marker 0xd",
            ),
            restart,
            False,
            "extraneous bytes before marker 0xd",
        ),
        Oddity("jpeg-premature-end", base[: len(base) * 3 // 4], base, False, "Premature end of JPEG file"),
        Oddity(
            "jpeg-bad-huffman-code",
            _first_warning(
                (base[:at] + b"\xff\x00\xff\x00" + base[at + 4 :] for at in range(ecs + 64, len(base) - 8, 7)),
                "bad Huffman code",
            ),
            base,
            False,
            "bad Huffman code",
        ),
    ]
    return kept + skipped
