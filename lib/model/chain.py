"""Chained propagation inside one volume: each slice is segmented from its neighbour's result.

The training episodes are adjacent-slice pairs (z, z+1), so a one-slice step is the task the network
learned. Starting at an annotated slice, the chain walks outward one slice at a time, each prediction
becoming the next support; it stops in a direction when the organ disappears (an empty prediction),
so it also finds where the organ ends.
"""
from __future__ import annotations

import numpy as np
import torch

from lib.model.sdfsmis import resize_mask, resize_slices


@torch.inference_mode()
def chain_segment(model, slices, start: int, start_mask, threshold: float | None = None,
                  min_pixels: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Walk from slice `start` (annotated with `start_mask`) outward in both directions.

    slices: (N, H, W) in [0, 1], consecutive slices of one volume in order; start_mask: (H, W).
    A step whose mask has fewer than `min_pixels` pixels (at network size) ends that direction.
    Returns (masks bool (N, H, W), probabilities float32 (N, H, W)); row `start` is `start_mask`,
    rows never reached are empty with probability 0.
    """
    vol = torch.as_tensor(np.asarray(slices, dtype=np.float32))
    if vol.ndim != 3:
        raise ValueError(f"slices must be (N, H, W), got shape {tuple(vol.shape)}")
    n, h, w = vol.shape
    if not 0 <= start < n:
        raise ValueError(f"start slice {start} is outside 0..{n - 1}")
    seed = torch.as_tensor(np.asarray(start_mask)).float()
    if seed.shape != (h, w):
        raise ValueError(f"start_mask {tuple(seed.shape)} differs from the slice size {(h, w)}")
    if not (seed > 0.5).any():
        raise ValueError("the start mask is empty: annotate the organ on the start slice")
    size = model.config.image_size
    thr = float(model.config.threshold if threshold is None else threshold)
    small = resize_slices(vol, size)                                       # (N, 1, S, S)
    seed_small = resize_mask(seed[None], size)
    probs = torch.zeros(n, h, w)
    probs[start] = (seed > 0.5).float()
    for step in (1, -1):
        mask = seed_small.float()
        z = start + step
        while 0 <= z < n:
            cache = model.encode_support(small[z - step:z - step + 1], mask)
            p = model.predict(small[z:z + 1], cache).float().cpu()         # (1, 1, S, S)
            mask = (p > thr).float()
            if int(mask.sum()) < min_pixels:
                break
            probs[z] = resize_slices(p, (h, w))[0, 0]
            z += step
    masks = (probs > thr).numpy()
    masks[start] = (seed > 0.5).numpy()
    return masks, probs.numpy()
