"""The decode-memory estimate, from headers alone: what each kind of image costs relative to
another of the same size (the real-server test holds the 16-bit case end to end)."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from serving.budget import decode_cost
from tests.serving.conftest import encode

SIDE = 1200


def cost(img: Image.Image, fmt: str, **kw) -> int:
    return decode_cost(Image.open(io.BytesIO(encode(img, fmt, **kw))))  # opened: the header only


@pytest.fixture(scope="module")
def costs() -> dict[str, int]:
    size = (SIDE, SIDE)
    palette = Image.new("RGB", size, (10, 200, 30)).quantize(16)
    frames = [Image.new("RGB", size, (255, 0, 0)), Image.new("RGB", size, (0, 0, 255))]
    return {
        "L": cost(Image.new("L", size), "PNG"),
        "RGB": cost(Image.new("RGB", size), "PNG"),
        "16-bit": cost(Image.new("I;16", size), "PNG"),
        "P": cost(palette, "PNG"),
        "P+alpha": cost(palette, "PNG", transparency=0),
        "RGBA": cost(Image.new("RGBA", size), "PNG"),
        "CMYK JPEG": cost(Image.new("CMYK", (2 * SIDE, 2 * SIDE)), "JPEG"),
        "RGB JPEG": cost(Image.new("RGB", (2 * SIDE, 2 * SIDE)), "JPEG"),
        "2 frames": cost(frames[0], "PNG", save_all=True, append_images=frames[1:]),
    }


def test_what_costs_more_to_decode_is_estimated_higher(costs):
    assert costs["16-bit"] >= 3 * costs["L"]  # 16-bit goes through wide temporaries
    assert costs["P+alpha"] >= 2 * costs["P"]  # composited through RGBA
    assert costs["RGBA"] > costs["RGB"]
    assert costs["2 frames"] == 2 * costs["RGB"]  # the decoder keeps the previous frame
    assert costs["CMYK JPEG"] > costs["RGB JPEG"]


def test_jpegs_are_costed_at_their_dct_scaled_size(costs):
    # 2400x2400 decodes at 1/8 (300x300 >= 256): far less than a 1200x1200 PNG.
    assert costs["RGB JPEG"] < costs["RGB"] / 10


def test_a_16_bit_photo_size_png_costs_about_a_gigabyte():
    """The issue's case: 6300x6300 16-bit, a 94 kB file, ~945 MB measured on main."""
    header = Image.open(io.BytesIO(encode(Image.new("I;16", (6300, 6300)), "PNG")))
    assert 0.9e9 < decode_cost(header) < 1.2e9
