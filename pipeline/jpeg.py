"""A JPEG file's marker structure, and the bytes in it that carry no image data.

libjpeg reads a JPEG as segments: SOI, then length-prefixed segments (APPn, COM, DQT, DHT,
SOF, DRI, SOS, ...), each scan's entropy-coded data after its SOS, and EOI. Two kinds of
stray bytes can sit outside all of that, and libjpeg itself skips them:
- junk where a marker should start ("N extraneous bytes before marker 0xXX"): between two
  header segments, or after the end of a scan's entropy-coded data;
- anything after the end-of-image marker (libjpeg stops reading at EOI; no warning).

`tidy(data)` walks the segments and returns the same file without the junk between
segments and without what follows EOI, with a note for each, plus where each scan's
entropy-coded data ends (junk at the end of a scan is part of that data to a structural walk:
only the decoder, having decoded every block of the scan, knows where the scan stopped;
pipeline.decode cuts it from what libjpeg reports). It never touches a segment's or a scan's
bytes, so decoding the tidied file gives exactly the pixels libjpeg gives for the original
when it skips the junk itself. A file whose structure cannot be walked (cut short, a
segment running past the end) is left to the decoder, which rejects it. The walk reads
every byte of the entropy-coded data (a few ms for a large photograph), so pipeline.decode
walks only a file whose strict decode warned, or which does not end in its end marker.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SOI, EOI, SOS = 0xD8, 0xD9, 0xDA
RST = range(0xD0, 0xD8)
# Markers without a length field (TEM, RSTn, SOI, EOI).
STANDALONE = frozenset({0x01, *RST, SOI, EOI})
# A marker: 0xFF (fill 0xFFs allowed before it) and a code that is neither 0x00 (a stuffed
# 0xFF in entropy-coded data) nor 0xFF.
MARKER = re.compile(rb"\xff+[^\x00\xff]")
# The end of a scan's entropy-coded data: the first marker that is not a restart marker.
SCAN_END = re.compile(rb"\xff+[^\x00\xd0-\xd7\xff]")


def junk_note(n: int, code: int) -> str:
    """libjpeg's own wording, so that a note can be looked up."""
    return f"{n} extraneous bytes before marker 0x{code:02x} (ignored)"


def trailing_note(n: int) -> str:
    return f"{n} bytes after the end-of-image marker (ignored)"


@dataclass(frozen=True)
class Tidied:
    data: bytes  # SOI, the segments and scans, EOI: no junk between segments, nothing after EOI
    notes: tuple[str, ...]  # what was removed between segments, in file order
    scan_ends: tuple[tuple[int, int], ...]  # (offset in `data` where a scan's data ends, the marker there)
    trailing: int  # bytes after EOI in the original


def tidy(data: bytes) -> Tidied | None:
    """The file without stray bytes between segments or after EOI, or None when its
    structure cannot be walked (the decoder then judges the original)."""
    if not data.startswith(b"\xff\xd8"):
        return None
    out = bytearray(data[:2])
    notes: list[str] = []
    scan_ends: list[tuple[int, int]] = []
    pos = 2
    while True:
        found = MARKER.search(data, pos)
        if found is None:
            return None  # no EOI: cut short
        code = data[found.end() - 1]
        if found.start() > pos:
            if code in RST:
                return None  # a restart marker outside any scan: not ours to judge
            notes.append(junk_note(found.start() - pos, code))
        out += bytes((0xFF, code))
        pos = found.end()
        if code == EOI:
            return Tidied(bytes(out), tuple(notes), tuple(scan_ends), len(data) - pos)
        if code in STANDALONE:
            continue
        length = int.from_bytes(data[pos : pos + 2], "big")
        if length < 2 or pos + length > len(data):
            return None
        out += data[pos : pos + length]
        pos += length
        if code == SOS:
            end = SCAN_END.search(data, pos)
            if end is None:
                return None
            out += data[pos : end.start()]
            scan_ends.append((len(out), data[end.end() - 1]))
            pos = end.start()


def cut(data: bytes, scan_ends: tuple[tuple[int, int], ...], index: int, n: int) -> tuple[bytes, tuple]:
    """`data` without the `n` bytes before the end of scan `index`, and the scan ends moved."""
    at = scan_ends[index][0]
    moved = tuple((end - n, code) if i >= index else (end, code) for i, (end, code) in enumerate(scan_ends))
    return data[: at - n] + data[at:], moved
