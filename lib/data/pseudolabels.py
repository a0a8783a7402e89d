"""Self-supervision pseudo-labels (ADNet/RPT): per-slice body mask and 3D supervoxels.

Both are computed on the volume min-max rescaled to 0-255, as ADNet's `generate_supervoxels.py` does.
ADNet runs a 3D Felzenszwalb graph segmentation (min_size=5000 voxels); no library ships a 3D
Felzenszwalb, so the supervoxels here come from scikit-image's SLIC in 3D (with the voxel spacing and
the body mask), followed by merging every segment smaller than `min_size` into its neighbours, so the
same guarantee holds: every supervoxel has at least `min_size` voxels.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.segmentation import relabel_sequential, slic

FG_THRESHOLD = 10.0      # body = rescaled intensity > 10 (ADNet/RPT `fg_thresh`)
MIN_SIZE = 5000          # smallest supervoxel, voxels (ADNet/RPT `n_sv=5000`, a minimum size)
SEGMENT_SIZE = 15000     # SLIC target: n_segments = body voxels / SEGMENT_SIZE (see docs/pseudolabels.md)
COMPACTNESS = 0.05       # SLIC compactness for intensities scaled to [0, 1] inside the body
SIGMA = 1.0              # SLIC pre-smoothing, in units of the smallest voxel spacing
MAX_ITER = 5             # SLIC k-means iterations (10 in scikit-image; 5 is ~2x faster, same quality here)


def rescale_to_255(volume) -> np.ndarray:
    """(H, W, Z) any dtype -> float32 (H, W, Z), min-max rescaled to [0, 255] (ADNet's rule)."""
    vol = np.asarray(volume, dtype=np.float32)
    if vol.ndim != 3:
        raise ValueError(f"expected a 3D volume (H, W, Z), got shape {vol.shape}")
    vol = np.nan_to_num(vol, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(vol.min()), float(vol.max())
    if hi <= lo:
        return np.zeros_like(vol)
    return (vol - lo) * (255.0 / (hi - lo))


def _largest_component(mask2d: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask2d, structure=np.ones((3, 3), dtype=bool))  # 8-connectivity
    if n <= 1:
        return labels > 0
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


def body_mask(volume, threshold: float = FG_THRESHOLD) -> np.ndarray:
    """(H, W, Z) volume -> bool (H, W, Z) body mask, slice by slice along the last axis.

    Rescale the whole volume to 0-255, threshold > `threshold`, keep the largest 8-connected
    component of each axial slice and fill its holes. A slice with no voxel above the threshold
    gets an empty mask.
    """
    fg = rescale_to_255(volume) > threshold
    out = np.zeros(fg.shape, dtype=bool)
    for z in range(fg.shape[2]):
        if fg[:, :, z].any():
            out[:, :, z] = ndimage.binary_fill_holes(_largest_component(fg[:, :, z]))
    return out


def _check_spacing(spacing) -> np.ndarray:
    sp = np.asarray(spacing, dtype=np.float64).ravel()
    if sp.shape != (3,) or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise ValueError(f"spacing must be 3 positive numbers (mm per voxel along H, W, Z), got {spacing!r}")
    return sp


def merge_small_segments(labels: np.ndarray, body: np.ndarray, min_size: int, spacing) -> np.ndarray:
    """Remove segments with fewer than `min_size` voxels and give their voxels the nearest
    remaining label (Euclidean, in mm); returns int32 labels 1..K, 0 outside `body`.

    Every returned segment has at least `min_size` voxels; a body smaller than `min_size` gives K=0.
    """
    labels = np.where(body, labels, 0).astype(np.int32, copy=False)
    sizes = np.bincount(labels.ravel())
    small = sizes < min_size
    small[0] = True
    if small.all():
        return np.zeros(labels.shape, dtype=np.int32)
    labels = np.where(small[labels], 0, labels)
    hole = body & (labels == 0)
    if hole.any():
        # restrict the distance transform to the body's bounding box (memory and time on big CT volumes)
        box = tuple(slice(idx.min(), idx.max() + 1) for idx in np.nonzero(body))
        sub = labels[box]
        _, nearest = ndimage.distance_transform_edt(sub == 0, sampling=spacing, return_indices=True)
        filled = sub[tuple(nearest)]
        sub[hole[box]] = filled[hole[box]]
    labels, _, _ = relabel_sequential(labels)
    return labels.astype(np.int32, copy=False)


def supervoxels(
    volume,
    spacing,
    body: np.ndarray | None = None,
    min_size: int = MIN_SIZE,
    segment_size: int = SEGMENT_SIZE,
    compactness: float = COMPACTNESS,
    sigma: float = SIGMA,
    max_iter: int = MAX_ITER,
    fg_threshold: float = FG_THRESHOLD,
) -> np.ndarray:
    """(H, W, Z) volume, spacing (mm, 3) -> uint16 (H, W, Z) supervoxels 1..K, 0 outside the body.

    SLIC in 3D on the 0-255 volume (`channel_axis=None`, spacing normalised to its smallest entry,
    seeded inside the body mask), `n_segments = round(body voxels / segment_size)`; then segments
    smaller than `min_size` are merged into their nearest neighbours. Deterministic.
    """
    vol = rescale_to_255(volume)
    sp = _check_spacing(spacing)
    if min_size < 1 or segment_size < 1:
        raise ValueError(f"min_size and segment_size must be >= 1, got {min_size} and {segment_size}")
    if body is None:
        body = body_mask(vol, threshold=fg_threshold)
    body = np.asarray(body, dtype=bool)
    if body.shape != vol.shape:
        raise ValueError(f"body mask shape {body.shape} differs from volume shape {vol.shape}")
    n_body = int(body.sum())
    if n_body < min_size:
        return np.zeros(vol.shape, dtype=np.uint16)
    n_segments = max(1, int(round(n_body / segment_size)))
    labels = slic(
        vol,
        n_segments=n_segments,
        compactness=compactness,
        sigma=sigma,
        spacing=sp / sp.min(),
        mask=body,
        channel_axis=None,
        start_label=1,
        max_num_iter=max_iter,
        enforce_connectivity=True,
    )
    labels = merge_small_segments(labels, body, min_size, sp)
    if labels.max() > np.iinfo(np.uint16).max:
        raise ValueError(f"{labels.max()} supervoxels do not fit uint16; raise segment_size")
    return labels.astype(np.uint16)
