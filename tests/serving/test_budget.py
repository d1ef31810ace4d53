"""The decode-memory estimate, from pipeline's header facts alone: what each kind of image
costs relative to another of the same size (the real-server test holds the 16-bit case end
to end; benchmarks/decode_memory.py holds the estimate above the measured peaks)."""

from __future__ import annotations

import pytest
from PIL import Image

from pipeline.preprocess import read_header
from serving.budget import decode_cost
from tests.serving.helpers import encode

SIDE = 1200


def header(img: Image.Image, fmt: str, **kw):
    return read_header(encode(img, fmt, **kw))  # the header only: no pixel decoded


@pytest.fixture(scope="module")
def headers() -> dict:
    size = (SIDE, SIDE)
    palette = Image.new("RGB", size, (10, 200, 30)).quantize(16)
    frames = [Image.new("RGB", size, (255, 0, 0)), Image.new("RGB", size, (0, 0, 255))]
    return {
        "L": header(Image.new("L", size), "PNG"),
        "RGB": header(Image.new("RGB", size), "PNG"),
        "16-bit": header(Image.new("I;16", size), "PNG"),
        "P": header(palette, "PNG"),
        "P+alpha": header(palette, "PNG", transparency=0),
        "RGBA": header(Image.new("RGBA", size), "PNG"),
        "WebP": header(Image.new("RGB", size), "WEBP"),
        "CMYK JPEG": header(Image.new("CMYK", (2 * SIDE, 2 * SIDE)), "JPEG"),
        "RGB JPEG": header(Image.new("RGB", (2 * SIDE, 2 * SIDE)), "JPEG"),
        "2 frames": header(frames[0], "PNG", save_all=True, append_images=frames[1:]),
    }


@pytest.fixture(scope="module")
def costs(headers) -> dict[str, int]:
    return {name: decode_cost(h) for name, h in headers.items()}


def test_what_costs_more_to_decode_is_estimated_higher(costs):
    assert costs["16-bit"] > costs["L"]  # two bytes a sample
    assert costs["P+alpha"] >= 1.5 * costs["P"]  # composited through RGBA
    assert costs["RGBA"] > costs["RGB"]
    assert costs["WebP"] > costs["RGB"]  # the WebP decoder's own buffer
    assert costs["2 frames"] == 2 * costs["RGB"]  # the decoder keeps the previous frame
    assert costs["CMYK JPEG"] > costs["RGB JPEG"]


def test_jpegs_are_costed_at_their_dct_scaled_size(costs):
    # 2400x2400 decodes at 1/8 (300x300 >= 256): far less than a 1200x1200 PNG.
    assert costs["RGB JPEG"] < costs["RGB"] / 10


def test_the_estimate_is_never_below_the_decoded_pixels_themselves(headers, costs):
    """pipeline.preprocess's decode_bytes: what the decode holds at once before any working
    copy. The budget's estimate, which adds the working copies, never falls under it."""
    for name, h in headers.items():
        assert costs[name] > h.decode_bytes, name
