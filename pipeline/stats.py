"""RGB statistics of the training set, for mean subtraction and the paper's "fancy PCA".

Paper 4.1(b): PCA on the RGB pixel values of the whole training set gives eigenvectors
p1..p3 and eigenvalues l1..l3 of the 3x3 covariance.

Which pixels: of every prepared 256x256 training image (the pixels before JPEG encoding),
the fixed grid of rows and columns 2, 6, 10, ..., 254 (`GRID_STEP` 4 from `GRID_OFFSET` 2):
4,096 pixels an image, 1/16 of them, 5.2 billion over ILSVRC-2012's 1.28 M images. Over all
65,536 pixels the accumulation cost as much as decoding, resizing and encoding together; on
the grid it is 3-6% of the command's per-image time on 640x480-class photos
(benchmarks/shard.py), and neighbouring pixels add almost no information to a training-set
mean and covariance (tests/pipeline/test_stats.py holds both: the grid moments equal a direct
float64 computation on the same pixels, and are close to the moments of every pixel).

Exact accumulation: per image the integer sums of x and of x x^T over its grid pixels (every
partial sum < 2**53, so the float64 products round back to the exact integers), summed as
int64 across images and as Python ints across shards. The result does not depend on how
shards were spread over processes or Ray tasks: same data, same bytes in stats.json.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

GRID_STEP = 4
GRID_OFFSET = 2


def grid_pixels(pixels: np.ndarray) -> np.ndarray:
    """The pixels the statistics are taken over: (N, 3) uint8."""
    return pixels[GRID_OFFSET::GRID_STEP, GRID_OFFSET::GRID_STEP].reshape(-1, 3)


@dataclass
class PixelMoments:
    num_images: int = 0
    num_pixels: int = 0
    sum: list[int] = field(default_factory=lambda: [0, 0, 0])
    sum_outer: list[list[int]] = field(default_factory=lambda: [[0] * 3 for _ in range(3)])
    _gram: np.ndarray = field(default_factory=lambda: np.zeros((4, 4), dtype=np.int64), repr=False, compare=False)
    _buffer: np.ndarray | None = field(default=None, repr=False, compare=False)

    def add_image(self, pixels: np.ndarray) -> None:
        grid = grid_pixels(pixels)
        if self._buffer is None or len(self._buffer) != len(grid):
            self._buffer = np.ones((len(grid), 4), dtype=np.float64)  # the 4th column counts pixels
        self._buffer[:, :3] = grid
        # [x 1]^T [x 1]: sum_outer in the top-left 3x3, sums in the last row, the count last.
        self._gram += np.rint(self._buffer.T @ self._buffer).astype(np.int64)
        self.num_images += 1

    def _flush(self) -> None:
        """Move the per-image accumulator into the exact (Python int) totals."""
        g = self._gram
        if g[3, 3]:
            self.num_pixels += int(g[3, 3])
            self.sum = [a + int(b) for a, b in zip(self.sum, g[3, :3])]
            self.sum_outer = [[a + int(b) for a, b in zip(ra, rb)] for ra, rb in zip(self.sum_outer, g[:3, :3])]
            g[:] = 0

    def merge(self, other: PixelMoments) -> None:
        self._flush()
        other._flush()
        self.num_images += other.num_images
        self.num_pixels += other.num_pixels
        self.sum = [a + b for a, b in zip(self.sum, other.sum)]
        self.sum_outer = [[a + b for a, b in zip(ra, rb)] for ra, rb in zip(self.sum_outer, other.sum_outer)]

    def to_json(self) -> dict:
        self._flush()
        return {
            "num_images": self.num_images,
            "num_pixels": self.num_pixels,
            "sum": self.sum,
            "sum_outer": self.sum_outer,
            "grid": {"step": GRID_STEP, "offset": GRID_OFFSET},
        }

    @classmethod
    def from_json(cls, d: dict) -> PixelMoments:
        return cls(
            num_images=d["num_images"],
            num_pixels=d["num_pixels"],
            sum=list(d["sum"]),
            sum_outer=[list(r) for r in d["sum_outer"]],
        )


def rgb_stats(moments: PixelMoments) -> dict:
    """The stats.json document (0-255 scale).

    eigenvectors[k] is the k-th eigenvector p_k (a unit RGB vector), paired with
    eigenvalues[k]; sorted by eigenvalue, largest first. The paper's lighting shift for one
    image is sum_k p_k * (alpha_k * eigenvalues[k]) with alpha_k ~ N(0, 0.1).
    """
    moments = PixelMoments.from_json(moments.to_json())
    n = moments.num_pixels
    if n == 0:
        raise ValueError("no training pixels: cannot compute RGB statistics")
    mean = np.array(moments.sum, dtype=np.float64) / n
    cov = np.array(moments.sum_outer, dtype=np.float64) / n - np.outer(mean, mean)
    cov = (cov + cov.T) / 2.0
    eigenvalues, eigenvectors = np.linalg.eigh(cov)
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
    # eigh's sign is arbitrary: fix it so the largest component of each vector is positive.
    for k in range(3):
        if eigenvectors[np.argmax(np.abs(eigenvectors[:, k])), k] < 0:
            eigenvectors[:, k] *= -1
    r = lambda a: np.round(np.asarray(a, dtype=np.float64), 10).tolist()  # noqa: E731
    return {
        "scale": "0-255",
        "pixels": {"rows_and_columns_from": GRID_OFFSET, "every": GRID_STEP},  # of every train image
        "num_images": moments.num_images,
        "num_pixels": n,
        "mean": r(mean),
        "std": r(np.sqrt(np.diag(cov))),
        "covariance": r(cov),
        "eigenvalues": r(eigenvalues),
        "eigenvectors": r(eigenvectors.T),
    }
