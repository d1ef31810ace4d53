"""RGB statistics of the training set, for mean subtraction and the paper's "fancy PCA".

Paper 4.1(b): PCA on the RGB pixel values of the whole training set gives eigenvectors
p1..p3 and eigenvalues l1..l3 of the 3x3 covariance. We accumulate exact integer moments
(sum of x and of x x^T over every pixel of every 256x256 training image), so the result does
not depend on how shards were spread over processes: same data, same bytes in stats.json.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class PixelMoments:
    num_images: int = 0
    num_pixels: int = 0
    sum: list[int] = field(default_factory=lambda: [0, 0, 0])
    sum_outer: list[list[int]] = field(default_factory=lambda: [[0] * 3 for _ in range(3)])

    def add_image(self, pixels: np.ndarray) -> None:
        flat = pixels.reshape(-1, 3).astype(np.float64)
        # Exact: each per-image sum is an integer < 2**53 (65536 px * 255**2), so the
        # float64 BLAS result rounds back to the exact integer.
        s = np.rint(flat.sum(axis=0)).astype(np.int64)
        so = np.rint(flat.T @ flat).astype(np.int64)
        self.num_images += 1
        self.num_pixels += flat.shape[0]
        self.sum = [a + int(b) for a, b in zip(self.sum, s)]
        self.sum_outer = [[a + int(b) for a, b in zip(ra, rb)] for ra, rb in zip(self.sum_outer, so)]

    def merge(self, other: "PixelMoments") -> None:
        self.num_images += other.num_images
        self.num_pixels += other.num_pixels
        self.sum = [a + b for a, b in zip(self.sum, other.sum)]
        self.sum_outer = [[a + b for a, b in zip(ra, rb)] for ra, rb in zip(self.sum_outer, other.sum_outer)]

    def to_json(self) -> dict:
        return {"num_images": self.num_images, "num_pixels": self.num_pixels, "sum": self.sum,
                "sum_outer": self.sum_outer}

    @classmethod
    def from_json(cls, d: dict) -> "PixelMoments":
        return cls(num_images=d["num_images"], num_pixels=d["num_pixels"], sum=list(d["sum"]),
                   sum_outer=[list(r) for r in d["sum_outer"]])


def rgb_stats(moments: PixelMoments) -> dict:
    """The stats.json document (0-255 scale).

    eigenvectors[k] is the k-th eigenvector p_k (a unit RGB vector), paired with
    eigenvalues[k]; sorted by eigenvalue, largest first. The paper's lighting shift for one
    image is sum_k p_k * (alpha_k * eigenvalues[k]) with alpha_k ~ N(0, 0.1).
    """
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
        "num_images": moments.num_images,
        "num_pixels": n,
        "mean": r(mean),
        "std": r(np.sqrt(np.diag(cov))),
        "covariance": r(cov),
        "eigenvalues": r(eigenvalues),
        "eigenvectors": r(eigenvectors.T),
    }
