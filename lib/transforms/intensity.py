"""Per-volume intensity scaling to [0, 1], shared by training, evaluation and the infer task; an organ's
intensities against its surroundings' (a log-odds table, lib.pipeline.refine)."""
from __future__ import annotations

import numpy as np
from monai.transforms import ScaleIntensityRangePercentiles
from scipy import ndimage

LOWER_PERCENTILE = 0.5
UPPER_PERCENTILE = 99.5

_scale = ScaleIntensityRangePercentiles(
    lower=LOWER_PERCENTILE, upper=UPPER_PERCENTILE, b_min=0.0, b_max=1.0, clip=True, dtype=np.float32
)


def normalize_volume(volume) -> np.ndarray:
    """(H, W, Z) any dtype -> float32 (H, W, Z) in [0, 1], percentiles 0.5/99.5 of the whole volume.

    One rule for MRI (arbitrary scale) and windowed CT (0-255); a constant volume maps to zeros.
    """
    arr = np.asarray(volume, dtype=np.float32)
    if not np.isfinite(arr).all():
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = np.percentile(arr, [LOWER_PERCENTILE, UPPER_PERCENTILE])
    if hi <= lo:
        return np.zeros_like(arr)
    return np.asarray(_scale(arr), dtype=np.float32)


BINS = 32      # intensity bins over [0, 1] of the organ's log-odds
CLIP = 4.0     # the log-odds are clipped to +-CLIP


def intensity_bins(image, bins: int = BINS) -> np.ndarray:
    """Values in [0, 1] (any shape) -> int64 bin indices 0..bins-1 (1.0 in the last bin)."""
    return np.clip((np.asarray(image, dtype=np.float32) * bins).astype(np.int64), 0, bins - 1)


def intensity_counts(image, mask, ring: float, bins: int = BINS) -> tuple[np.ndarray, np.ndarray]:
    """Per slice, how often each intensity occurs in the organ and in the band around it.

    image (H, W) or (N, H, W) in [0, 1], its organ mask bool (same shape), ring: the width in pixels of
    the band around the organ (per slice; a slice without organ has none) that stands for its
    surroundings -> organ and band counts, float64 (N, bins) each (N = 1 for one slice).
    """
    image = np.asarray(image, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    if image.shape != mask.shape:
        raise ValueError(f"image {image.shape} and mask {mask.shape} differ in shape")
    idx = intensity_bins(image, bins).reshape((-1,) + image.shape[-2:])
    organ, band = [], []
    for values, m in zip(idx, mask.reshape(idx.shape)):
        around = (ndimage.distance_transform_edt(~m) <= ring) & ~m if m.any() else m
        organ.append(np.bincount(values[m], minlength=bins))
        band.append(np.bincount(values[around], minlength=bins))
    return np.asarray(organ, dtype=np.float64), np.asarray(band, dtype=np.float64)


def log_odds(organ, band, clip: float = CLIP) -> np.ndarray:
    """Summed counts (bins,) of the organ and of its band -> float32 (bins,): per intensity bin,
    log p(value | organ) - log p(value | band), counts Laplace-smoothed (+1 a bin), clipped to +-clip."""
    organ, band = np.asarray(organ) + 1.0, np.asarray(band) + 1.0
    return np.clip(np.log(organ / organ.sum()) - np.log(band / band.sum()), -clip, clip).astype(np.float32)


def organ_log_odds(image, mask, ring: float, bins: int = BINS, clip: float = CLIP) -> np.ndarray:
    """How much more often the organ than its surroundings has each intensity: `log_odds` of the
    `intensity_counts` of all slices -> float32 (bins,). Read a slice's values with `log_odds_at`."""
    organ, band = intensity_counts(image, mask, ring, bins)
    return log_odds(organ.sum(0), band.sum(0), clip)


def log_odds_at(table: np.ndarray, image) -> np.ndarray:
    """A table of `organ_log_odds` read at every pixel of `image` (any shape, in [0, 1]) -> float32."""
    return table[intensity_bins(image, len(table))]
