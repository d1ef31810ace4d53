"""Contract 3, second half: the evaluation crops and the normalisation numbers.

One definition, used by the DALI pipelines (trainer.dali_loader builds its operators from
these numbers), the webdataset back-end and serving (which call the numpy functions here); a
test holds them equal on the same image. Pure numpy (no image library is imported: reading a
shard set's manifest, which builds a Normalization, loads nothing more), so serving needs
neither DALI nor a GPU. The pixels themselves come from pipeline.sharded.

Normalisation, as the paper: subtract the training set's mean RGB (0-255 scale) from every
pixel, nothing else ("the net trains on centred raw RGB values"). Dividing by the std is an
option (`divide_by_std`), off by default: the paper's N(0, 0.01) initialisation is tuned
for inputs of that raw scale.

Fancy PCA lighting (paper 4.1b), the scale convention: the shift added to every pixel of an
image is sum_k p_k * alpha_k * lambda_k with alpha_k ~ N(0, 0.1), where lambda_k are the
eigenvalues of the covariance of pixel values in [0, 1] (as in fb.resnet.torch and Caffe;
the formula is not scale-free, and with 0-255 eigenvalues the shift would be ~400 levels).
In 0-255 units that is sum_k p_k * alpha_k * lambda255_k / 255, with lambda255 from stats.json.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LIGHTING_ALPHA_STD = 0.1
PCA_PIXEL_SCALE = 255.0


@dataclass(frozen=True)
class Normalization:
    mean: tuple[float, float, float]  # RGB, 0-255
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)  # divisor; (1, 1, 1) = the paper

    @classmethod
    def from_stats(cls, stats: dict, divide_by_std: bool = False) -> Normalization:
        mean = tuple(float(v) for v in stats["mean"])
        std = tuple(float(v) for v in stats["std"]) if divide_by_std else (1.0, 1.0, 1.0)
        return cls(mean=mean, std=std)  # type: ignore[arg-type]

    def to_json(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_json(cls, d: dict) -> Normalization:
        return cls(mean=tuple(d["mean"]), std=tuple(d["std"]))


@dataclass(frozen=True)
class Lighting:
    """The paper's PCA colour augmentation parameters, from stats.json."""

    eigenvalues: tuple[float, float, float]  # of the 0-255 covariance, descending
    eigenvectors: tuple[tuple[float, float, float], ...]  # row k is p_k
    alpha_std: float = LIGHTING_ALPHA_STD

    @classmethod
    def from_stats(cls, stats: dict, alpha_std: float = LIGHTING_ALPHA_STD) -> Lighting:
        return cls(
            eigenvalues=tuple(stats["eigenvalues"]),
            eigenvectors=tuple(tuple(v) for v in stats["eigenvectors"]),
            alpha_std=alpha_std,
        )

    def shift_weights(self) -> np.ndarray:
        """lambda_k on the [0, 1] scale expressed in 0-255 output units: shift = P^T (alpha * w)."""
        return np.asarray(self.eigenvalues, dtype=np.float64) / PCA_PIXEL_SCALE

    def shift(self, alpha: np.ndarray) -> np.ndarray:
        """The RGB shift (0-255 units) for draws alpha (..., 3): sum_k p_k * alpha_k * w_k,
        one row per image. The DALI pipeline computes the same sum in its graph."""
        return (np.asarray(alpha, dtype=np.float64) * self.shift_weights()) @ np.asarray(self.eigenvectors, np.float64)

    def shift_covariance(self) -> np.ndarray:
        """Covariance of the added RGB shift over draws: P^T diag((alpha_std * w)^2) P."""
        p = np.asarray(self.eigenvectors, dtype=np.float64)
        return p.T @ np.diag((self.alpha_std * self.shift_weights()) ** 2) @ p


def center_offset(size: int, crop: int) -> int:
    """Where the centre crop starts: (size - crop) / 2 rounded half up, as DALI's
    crop_pos 0.5 does (256 -> 227: 14.5 -> 15)."""
    return int(np.floor((size - crop) / 2 + 0.5))


def ten_crop_boxes(size: int, crop: int) -> list[tuple[int, int, bool]]:
    """The paper's 10 test patches as (top, left, mirrored): four corners and the centre,
    each followed by its horizontal reflection. The DALI pipeline uses the same order."""
    c, far = center_offset(size, crop), size - crop
    corners = [(0, 0), (0, far), (far, 0), (far, far), (c, c)]
    return [(top, left, mirror) for top, left in corners for mirror in (False, True)]


def normalize_chw(patch_hwc: np.ndarray, norm: Normalization) -> np.ndarray:
    """uint8 HWC patch -> float32 CHW, (x - mean) / std. (The uint8 transpose first: a
    float copy through a transposed view costs several times more.)"""
    x = np.ascontiguousarray(patch_hwc.transpose(2, 0, 1)).astype(np.float32)
    x -= np.asarray(norm.mean, dtype=np.float32)[:, None, None]
    x /= np.asarray(norm.std, dtype=np.float32)[:, None, None]
    return x


def eval_crops(pixels: np.ndarray, crop: int, norm: Normalization, ten_crop: bool = False) -> np.ndarray:
    """A 256x256 RGB image -> (1, 3, crop, crop) centre crop, or (10, 3, crop, crop)."""
    size = pixels.shape[0]
    if ten_crop:
        boxes = ten_crop_boxes(size, crop)
    else:
        c = center_offset(size, crop)
        boxes = [(c, c, False)]
    out = []
    for top, left, mirror in boxes:
        patch = pixels[top : top + crop, left : left + crop]
        out.append(normalize_chw(patch[:, ::-1] if mirror else patch, norm))
    return np.stack(out)
