"""The one preprocessing function: every odd image kind ImageNet has, and every broken one."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipeline.preprocess import ImageError, encode_jpeg, prepare_image

PHOTOS = Path(__file__).resolve().parents[3] / "shared" / "photos"


def quadrants(w: int, h: int) -> Image.Image:
    """Red top-left, green top-right, blue bottom-left, white bottom-right: orientation and
    crop position are both visible in the output."""
    img = Image.new("RGB", (w, h))
    d = ImageDraw.Draw(img)
    d.rectangle((0, 0, w // 2, h // 2), fill=(255, 0, 0))
    d.rectangle((w // 2, 0, w, h // 2), fill=(0, 255, 0))
    d.rectangle((0, h // 2, w // 2, h), fill=(0, 0, 255))
    d.rectangle((w // 2, h // 2, w, h), fill=(255, 255, 255))
    return img


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def corner_colours(pixels: np.ndarray) -> list[tuple[int, ...]]:
    """Mean colour in the four 32x32 corners, rounded to the nearest 0/255 per channel."""
    corners = [pixels[8:40, 8:40], pixels[8:40, -40:-8], pixels[-40:-8, 8:40], pixels[-40:-8, -40:-8]]
    return [tuple(int(round(c / 255)) * 255 for c in p.reshape(-1, 3).mean(0)) for p in corners]


RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


@pytest.mark.parametrize("w,h", [(500, 375), (375, 500), (256, 256), (1200, 300), (100, 80), (3000, 2000)])
def test_output_is_256_square_rgb_of_the_central_patch(w, h):
    prepared = prepare_image(encode(quadrants(w, h), "PNG"))
    assert prepared.pixels.shape == (256, 256, 3) and prepared.pixels.dtype == np.uint8
    # The centre crop of a quadrant image keeps all four quadrants, in place.
    assert corner_colours(prepared.pixels) == [RED, GREEN, BLUE, WHITE]


def test_shorter_side_scaled_then_centre_cropped_matches_direct_computation():
    # A horizontal ramp, 512 wide and 256 high: the crop keeps columns 128..384.
    ramp = np.tile(np.arange(512, dtype=np.float64)[None, :, None] / 2, (256, 1, 3)).astype(np.uint8)
    out = prepare_image(encode(Image.fromarray(ramp), "PNG")).pixels.astype(int)
    assert abs(out[:, 0].mean() - 64) <= 1 and abs(out[:, -1].mean() - 191.5) <= 1


def test_jpeg_path_agrees_with_full_decode_lanczos_reference():
    rng = np.random.RandomState(0)
    smooth = Image.fromarray(rng.randint(0, 255, (12, 16, 3), dtype=np.uint8)).resize((1600, 1200), Image.BICUBIC)
    data = encode(smooth, "JPEG", quality=95)
    got = prepare_image(data).pixels.astype(float)
    full = Image.open(io.BytesIO(data)).convert("RGB").resize((341, 256), Image.LANCZOS)
    ref = np.asarray(full.crop((42, 0, 298, 256))).astype(float)
    psnr = 10 * np.log10(255**2 / np.mean((got - ref) ** 2))
    assert psnr > 35


def test_exif_orientation_is_applied():
    upright = quadrants(400, 300)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated; "rotate 90 CW to display"
    data = encode(upright.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif.tobytes())
    assert corner_colours(prepare_image(data).pixels) == [RED, GREEN, BLUE, WHITE]


@pytest.mark.parametrize("mode", ["L", "1", "P", "CMYK", "RGBA", "LA", "YCbCr"])
def test_every_mode_becomes_rgb(mode):
    img = quadrants(320, 300)
    if mode == "P":
        img = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    elif mode != "YCbCr":
        img = img.convert(mode)
    fmt = "JPEG" if mode in ("CMYK", "YCbCr", "L") else "PNG"
    if mode == "YCbCr":
        img = img.convert("YCbCr")
    prepared = prepare_image(encode(img, fmt, **({"quality": 95} if fmt == "JPEG" else {})))
    assert prepared.pixels.shape == (256, 256, 3)
    if mode in ("P", "CMYK", "RGBA", "YCbCr"):
        assert corner_colours(prepared.pixels) == [RED, GREEN, BLUE, WHITE]
    else:  # greyscale: all channels equal
        assert np.array_equal(prepared.pixels[..., 0], prepared.pixels[..., 2])


def test_transparent_pixels_become_white_not_their_hidden_colour():
    img = Image.new("RGBA", (300, 300), (255, 0, 0, 0))  # fully transparent red
    px = prepare_image(encode(img, "PNG")).pixels
    assert px.min() >= 254


def test_palette_png_with_transparency():
    img = Image.new("P", (300, 300), 0)
    img.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    ImageDraw.Draw(img).rectangle((150, 0, 300, 300), fill=1)
    img.info["transparency"] = 0
    px = prepare_image(encode(img, "PNG", transparency=0)).pixels
    assert tuple(px[128, 10]) == (255, 255, 255) and tuple(px[128, 250]) == (0, 255, 0)


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    arr = np.full((300, 300), 32768, dtype=np.uint16)  # mid-grey in 16 bits
    px = prepare_image(encode(Image.fromarray(arr), "PNG")).pixels
    assert abs(int(px.mean()) - 128) <= 1  # Pillow's plain convert would give 255


def test_png_named_jpeg_is_read_by_content():
    prepared = prepare_image(encode(quadrants(300, 300), "PNG"))
    assert prepared.source_format == "PNG"


@pytest.mark.parametrize(
    "data,needle",
    [
        (b"", "empty"),
        (b"hello, I am text\n" * 10, "not an image"),
        (None, "truncated"),
        (None, "corrupt"),
    ],
)
def test_broken_inputs_raise_image_error_with_reason(data, needle):
    good = encode(quadrants(400, 300), "JPEG", quality=90)
    if data is None and needle == "truncated":
        data = good[: len(good) // 3]
    elif data is None:  # a JPEG signature followed by garbage: identified, then unreadable
        data = good[:3] + bytes(np.random.RandomState(1).randint(0, 255, 3000, dtype=np.uint8))
        needle = "not an image"
    with pytest.raises(ImageError) as err:
        prepare_image(data)
    assert needle in err.value.reason


def test_decompression_bomb_is_refused_before_decoding():
    bomb = encode(Image.new("1", (10_000, 10_000)), "PNG")  # 100 MP, a few KB on disk
    assert len(bomb) < 100_000
    with pytest.raises(ImageError) as err:
        prepare_image(bomb)
    assert err.value.kind == "too_large"
    with pytest.raises(ImageError):
        prepare_image(encode(Image.new("RGB", (600, 500)), "PNG"), max_pixels=250_000)


def test_format_and_animation_policy_for_serving():
    gif = encode(quadrants(300, 300).convert("P"), "GIF")
    with pytest.raises(ImageError) as err:
        prepare_image(gif, allowed_formats=frozenset({"JPEG", "PNG"}))
    assert err.value.kind == "unsupported_format"
    frames = [quadrants(300, 300), quadrants(300, 300).rotate(90)]
    buf = io.BytesIO()
    frames[0].save(buf, format="PNG", save_all=True, append_images=frames[1:])
    with pytest.raises(ImageError):
        prepare_image(buf.getvalue(), allow_animated=False)
    assert prepare_image(buf.getvalue()).pixels.shape == (256, 256, 3)  # sharder: first frame


def test_encode_is_deterministic_and_decodes_back_close():
    px = prepare_image(encode(quadrants(500, 375), "PNG")).pixels
    a, b = encode_jpeg(px, 90), encode_jpeg(px, 90)
    assert a == b
    back = np.asarray(Image.open(io.BytesIO(a)))
    assert back.shape == (256, 256, 3) and np.abs(back.astype(int) - px).mean() < 3


@pytest.mark.skipif(not PHOTOS.is_dir(), reason="../shared/photos not present")
def test_real_photographs_psnr_against_full_decode_lanczos():
    psnrs = []
    for path in sorted(PHOTOS.glob("*.jpg")):
        data = path.read_bytes()
        out = np.asarray(Image.open(io.BytesIO(encode_jpeg(prepare_image(data).pixels)))).astype(float)
        full = Image.open(io.BytesIO(data)).convert("RGB")
        w, h = full.size
        s = 256 / min(w, h)
        full = full.resize((max(256, round(w * s)), max(256, round(h * s))), Image.LANCZOS)
        left, top = (full.size[0] - 256) // 2, (full.size[1] - 256) // 2
        ref = np.asarray(full.crop((left, top, left + 256, top + 256))).astype(float)
        psnrs.append(10 * np.log10(255**2 / np.mean((out - ref) ** 2)))
    assert np.mean(psnrs) >= 30


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_every_exif_orientation_matches_pillows_exif_transpose(orientation, fmt):
    """prepare_image applies orientation after the crop (cheaper); the result must equal
    cropping the image Pillow's exif_transpose shows upright."""
    from PIL import ImageOps

    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(quadrants(400, 300), fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    expected = corner_colours(prepare_image(encode(upright, "PNG")).pixels)
    assert corner_colours(prepare_image(data).pixels) == expected


def test_sixteen_bit_and_large_images_make_no_full_size_float_copies():
    """A 3000x3000 16-bit PNG (18 MB decoded): what numpy and Python allocate while preparing
    it stays far below one full-size copy (a float64 copy alone would be 72 MB)."""
    import tracemalloc

    y, x = np.indices((3000, 3000), dtype=np.uint32)
    data = encode(Image.fromarray(((x * 7 + y * 3) % 65536).astype(np.uint16)), "PNG")
    tracemalloc.start()
    try:
        prepared = prepare_image(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert prepared.pixels.shape == (256, 256, 3)
    assert peak < 4_000_000, f"{peak:,} bytes traced"


def test_read_header_reports_size_mode_depth_frames_transparency_and_decode_memory():
    from pipeline.preprocess import read_header

    png16 = read_header(encode(Image.fromarray(np.zeros((300, 400), dtype=np.uint16)), "PNG"))
    assert (png16.format, png16.width, png16.height, png16.mode, png16.bits, png16.frames) == (
        "PNG",
        400,
        300,
        "I;16",
        16,
        1,
    )
    assert png16.decode_bytes == 400 * 300 * 2
    jpeg = read_header(encode(quadrants(2000, 1500), "JPEG", quality=90))
    assert (jpeg.mode, jpeg.bits) == ("RGB", 8)
    assert jpeg.decode_bytes == 500 * 375 * 3  # libjpeg-turbo decodes it at 1/4 scale
    frames = [quadrants(300, 300), quadrants(300, 300).rotate(90)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    assert read_header(buf.getvalue()).frames == 2
    assert not png16.transparency
    palette = Image.new("RGB", (40, 30), (10, 200, 30)).quantize(4)
    assert read_header(encode(palette, "PNG", transparency=0)).transparency
    with pytest.raises(ImageError):
        read_header(b"not an image at all")
