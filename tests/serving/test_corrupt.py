"""Every corruption kind the sharder skips (tests/corrupt_images.py) gets a 4xx JSON error
from POST /predict, never a 200 on half-decoded pixels, and the server stays up. The JPEG
oddities get the sharder's outcome: stray bytes that hold no image data are answered as the
clean file is, damage that loses image data gets 400."""

from __future__ import annotations

import httpx
import pytest

from tests.corrupt_images import catalogue, jpeg_oddities, photo

CASES = catalogue()
ODDITIES = jpeg_oddities()
SERVED = ("JPEG", "PNG", "WEBP", "BMP")  # the serving formats; GIF and TIFF are refused as such (415)


def post(url: str, data: bytes, ctype: str) -> httpx.Response:
    return httpx.post(f"{url}/predict", content=data, headers={"content-type": ctype}, timeout=60)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_each_corruption_kind_gets_a_4xx(server, case):
    r = post(server, case.data, case.content_type)
    assert 400 <= r.status_code < 500, (case.name, r.status_code, r.text)
    body = r.json()
    assert body["detail"]
    if case.fmt in SERVED:
        assert (r.status_code, body["error"]) == (400, "invalid_image"), (case.name, body)
        assert case.reason in body["detail"], (case.name, body)
    else:
        assert r.status_code in (400, 415), (case.name, body)


def test_the_intact_sources_are_answered_and_the_server_is_still_up(server):
    for fmt in SERVED:
        r = post(server, photo(fmt), f"image/{fmt.lower()}")
        assert r.status_code == 200 and len(r.json()["predictions"]) == 5, (fmt, r.text)
    assert httpx.get(f"{server}/health", timeout=10).status_code == 200


@pytest.mark.parametrize("odd", ODDITIES, ids=lambda o: o.name)
def test_each_jpeg_oddity_gets_the_sharders_outcome(server, odd):
    r = post(server, odd.data, "image/jpeg")
    if odd.kept:
        clean = post(server, odd.clean, "image/jpeg")
        assert (r.status_code, clean.status_code) == (200, 200), (odd.name, r.text)
        assert r.json()["predictions"] == clean.json()["predictions"]  # the same pixels, the same answer
    else:
        assert (r.status_code, r.json()["error"]) == (400, "invalid_image"), (odd.name, r.text)
        assert odd.expect in r.json()["detail"], (odd.name, r.json())
