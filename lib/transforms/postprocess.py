"""Post-processing of predicted organ masks: MONAI KeepLargestConnectedComponent and the intensity gate."""
from __future__ import annotations

import numpy as np
import torch
from monai.transforms import KeepLargestConnectedComponent
from scipy import ndimage

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


def intensity_gate(query, masks, support_image, support_mask, margin: float = 0.1,
                   keep: float = 0.1) -> np.ndarray:
    """Keep the predicted pixels whose intensity the annotated organ has (not in the paper).

    query (N, H, W) and support_image (k, H', W') on one intensity scale (the normalised volumes);
    masks bool (N, H, W) predictions; support_mask bool (k, H', W') the annotation. The organ's range
    is the 2nd-98th percentile of the support image inside the annotation, widened by `margin` times
    its width. Each slice keeps mask & in-range, opened by a 3 x 3 cross (speckle), holes filled
    (vessels, lesions); a slice that keeps less than `keep` of its mask becomes empty (the organ ended
    there, or the mask lies on other tissue). -> bool (N, H, W).
    """
    masks = np.asarray(masks, dtype=bool)
    values = np.asarray(support_image)[np.asarray(support_mask, dtype=bool)]
    if not values.size:
        raise ValueError("the support mask is empty: the gate needs the annotated organ's intensities")
    lo, hi = np.quantile(values, [0.02, 0.98])
    lo, hi = lo - margin * (hi - lo), hi + margin * (hi - lo)
    query = np.asarray(query)
    out = np.zeros_like(masks)
    for i, mask in enumerate(masks):
        if not mask.any():
            continue
        kept = mask & (query[i] >= lo) & (query[i] <= hi)
        kept = ndimage.binary_fill_holes(ndimage.binary_opening(kept))
        if kept.sum() >= keep * mask.sum():
            out[i] = kept
    return out


def chain_gate(slices, start: int, start_mask):
    """The intensity gate as a chained walk's `verify` (lib.pipeline.walk): slices (N, H, W) of the walk,
    the annotation `start_mask` (H, W) on slices[start] -> verify(z, mask bool (H, W)) -> gated mask."""
    ref_image, ref_mask = np.asarray(slices[start])[None], np.asarray(start_mask, dtype=bool)[None]
    return lambda z, mask: intensity_gate(np.asarray(slices[z])[None], np.asarray(mask)[None], ref_image, ref_mask)[0]
