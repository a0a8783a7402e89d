"""Post-processing of predicted organ masks (MONAI KeepLargestConnectedComponent)."""
from __future__ import annotations

import numpy as np
import torch
from monai.transforms import KeepLargestConnectedComponent

_LARGEST = KeepLargestConnectedComponent(applied_labels=[1], is_onehot=False, connectivity=None)


def largest_component(mask) -> np.ndarray:
    """bool (..., ) 2D or 3D mask -> bool mask keeping only its largest connected part (full connectivity).

    An organ is one connected piece; stray blobs elsewhere are false positives. Empty stays empty.
    """
    arr = np.asarray(mask, dtype=bool)
    if not arr.any():
        return arr.copy()
    out = _LARGEST(torch.from_numpy(arr[None].astype(np.uint8)))
    return np.asarray(out[0], dtype=bool)
