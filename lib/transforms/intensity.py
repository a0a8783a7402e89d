"""Per-volume intensity scaling to [0, 1], shared by training, evaluation and the infer task."""
from __future__ import annotations

import numpy as np
from monai.transforms import ScaleIntensityRangePercentiles

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
