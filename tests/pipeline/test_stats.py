"""stats.json: exact moments over a documented pixel grid, independent of how the work was
split, and close to the moments of every pixel."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from pipeline.stats import GRID_OFFSET, GRID_STEP, PixelMoments, rgb_stats


def images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.RandomState(seed)
    out = []
    for _ in range(n):  # smooth colour fields plus noise: correlated channels, as photos have
        base = rng.randint(0, 256, (8, 8, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(base).resize((256, 256), Image.BICUBIC), dtype=np.int16)
        out.append(np.clip(smooth + rng.randint(-20, 21, smooth.shape), 0, 255).astype(np.uint8))
    return out


def direct(pixels: list[np.ndarray], step: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and population covariance straight from numpy in float64."""
    allpx = np.concatenate([p[offset::step, offset::step].reshape(-1, 3) for p in pixels]).astype(np.float64)
    return allpx.mean(0), np.cov(allpx.T, bias=True)


def test_equal_to_a_direct_float64_computation_over_the_same_pixels():
    imgs = images(40)
    m = PixelMoments()
    for p in imgs:
        m.add_image(p)
    stats = rgb_stats(m)
    mean, cov = direct(imgs, GRID_STEP, GRID_OFFSET)
    assert stats["num_images"] == 40 and stats["num_pixels"] == 40 * (256 // GRID_STEP) ** 2
    assert np.allclose(stats["mean"], mean, rtol=0, atol=1e-9)
    assert np.allclose(stats["covariance"], cov, rtol=0, atol=1e-7)
    # the integer moments themselves are exact
    grid = np.concatenate([p[GRID_OFFSET::GRID_STEP, GRID_OFFSET::GRID_STEP].reshape(-1, 3) for p in imgs]).astype(
        np.int64
    )
    doc = m.to_json()
    assert doc["sum"] == grid.sum(0).tolist() and doc["sum_outer"] == (grid.T @ grid).tolist()


def test_close_to_the_moments_of_every_pixel():
    imgs = images(40, seed=1)
    m = PixelMoments()
    for p in imgs:
        m.add_image(p)
    stats = rgb_stats(m)
    mean, cov = direct(imgs, 1, 0)
    assert np.allclose(stats["mean"], mean, atol=0.5)
    assert np.allclose(stats["covariance"], cov, rtol=0.02, atol=5)


def test_the_same_bytes_however_the_images_are_split_and_merged():
    imgs = images(30, seed=2)
    whole = PixelMoments()
    for p in imgs:
        whole.add_image(p)
    parts = [PixelMoments() for _ in range(4)]
    for i, p in enumerate(imgs):
        parts[i % 4].add_image(p)
    merged = PixelMoments()
    for part in reversed(parts):  # through JSON, as shard records travel
        merged.merge(PixelMoments.from_json(json.loads(json.dumps(part.to_json()))))
    assert json.dumps(rgb_stats(merged)) == json.dumps(rgb_stats(whole))


def test_eigen_decomposition_is_consistent():
    m = PixelMoments()
    for p in images(10, seed=3):
        m.add_image(p)
    stats = rgb_stats(m)
    vals, vecs, cov = np.array(stats["eigenvalues"]), np.array(stats["eigenvectors"]), np.array(stats["covariance"])
    assert list(vals) == sorted(vals, reverse=True) and (vals > 0).all()
    assert np.allclose(vecs @ vecs.T, np.eye(3), atol=1e-8)
    for k in range(3):
        assert np.allclose(cov @ vecs[k], vals[k] * vecs[k], rtol=1e-6, atol=1e-6)
    assert stats["pixels"] == {"rows_and_columns_from": GRID_OFFSET, "every": GRID_STEP}
