"""Chained propagation: each slice of a volume is segmented from its neighbour's result.

The training episodes are near-slice pairs, so a one-slice step is the task the network learned.
Starting at an annotated slice, the chain walks outward one slice at a time, each result becoming the
next support; a direction ends where the organ disappears (an empty result), so the chain also finds
where the organ ends. `walk` is the walk itself, for any step (the network here, registration in the
evaluation's baseline); `seeded_chain` starts it from a slice segmented from another volume.

Two hooks keep this module free of SimpleITK and scipy: `align` warps the previous slice and its mask
onto the next one before the network sees them (lib.transforms.align, the `mini` model's
`align_support`), and `verify` checks each result before it becomes the next support (the app's
intensity gate, lib.transforms.postprocess), so that an error is not carried along the chain.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from lib.model.sdfsmis import apply_prior_edits, resize_mask, resize_slices

Step = Callable[[int, int, np.ndarray], np.ndarray]   # (z_from, z_to, bool mask of z_from (H, W)) -> mask of z_to


def walk(n: int, start: int, start_mask: np.ndarray, step: Step) -> dict[int, np.ndarray]:
    """Visit start+1, start+2, ... then start-1, start-2, ... of n slices, each from its neighbour
    towards `start`; a direction ends at the edge or after an empty mask.
    -> {z: bool (H, W) mask} of the visited slices, `start_mask` at `start`."""
    masks = {start: np.asarray(start_mask, dtype=bool)}
    for d in (1, -1):
        z = start + d
        while 0 <= z < n:
            masks[z] = np.asarray(step(z - d, z, masks[z - d]), dtype=bool)
            if not masks[z].any():
                break
            z += d
    return masks


@torch.inference_mode()
def chain_segment(model, slices, start: int, start_mask, threshold: float | None = None, min_pixels: int = 1,
                  align: Callable | None = None, verify: Callable | None = None,
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Walk from slice `start` (annotated with `start_mask`) outward in both directions with the network.

    slices: (N, H, W) in [0, 1], consecutive slices of one volume in order; start_mask: (H, W).
    A step whose mask has fewer than `min_pixels` pixels (at network size) ends that direction.
    align(query (H, W), support image (H, W), support mask (H, W)) -> (image, mask): the support as
    the network sees it (default: unchanged). verify(z, mask bool (H, W)) -> mask: a check of each
    result before it is kept and carried on.
    Returns (masks bool (N, H, W), probabilities float32 (N, H, W)); row `start` is `start_mask`, rows
    never reached are empty with probability 0; masks == probabilities > threshold (pixels that
    `verify` removed have probability 0, pixels it added just above the threshold).
    """
    vol = np.asarray(slices, dtype=np.float32)
    if vol.ndim != 3:
        raise ValueError(f"slices must be (N, H, W), got shape {tuple(vol.shape)}")
    n, h, w = vol.shape
    if not 0 <= start < n:
        raise ValueError(f"start slice {start} is outside 0..{n - 1}")
    seed = np.asarray(start_mask, dtype=np.float32)
    if seed.shape != (h, w):
        raise ValueError(f"start_mask {tuple(seed.shape)} differs from the slice size {(h, w)}")
    if not (seed > 0.5).any():
        raise ValueError("the start mask is empty: annotate the organ on the start slice")
    size = model.config.image_size
    thr = float(model.config.threshold if threshold is None else threshold)
    edit = getattr(model.config, "edit_prior", False)       # apply_prior_edits: the model's inference default
    probs = np.zeros((n, h, w), dtype=np.float32)

    def step(a: int, b: int, mask: np.ndarray) -> np.ndarray:
        s_img, s_mask = (vol[a], mask) if align is None else align(vol[b], vol[a], mask)
        cache = model.encode_support(resize_slices(s_img[None], size),
                                     resize_mask(np.asarray(s_mask, np.float32)[None], size).float())
        p = model.predict(resize_slices(vol[b][None], size), cache).float().cpu()     # (1, 1, S, S)
        if int((p > thr).sum()) < min_pixels:
            return np.zeros((h, w), dtype=bool)
        prob = resize_slices(p, (h, w))[0, 0].numpy()
        if edit:
            prior = resize_slices(model.decode_prior(cache).float().cpu(), (h, w))[0, 0].numpy()
            prob = apply_prior_edits(prob, prior, s_mask, thr)
        out = prob > thr
        if verify is not None:
            out = np.asarray(verify(b, out), dtype=bool)
        probs[b] = np.where(out, np.maximum(prob, np.nextafter(np.float32(thr), np.float32(1))), 0.0)
        return out

    masks = walk(n, start, seed > 0.5, step)
    out = np.zeros((n, h, w), dtype=bool)
    for z, m in masks.items():
        out[z] = m
    probs[start] = out[start]
    return out, probs


def seeded_chain(model, slices, seed: int, support_image, support_mask, threshold: float | None = None,
                 align: Callable | None = None, verify_for: Callable | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Across volumes: slices[seed] is segmented from a support slice of another volume (one
    `model.segment` call, with `align`), then the walk goes on inside `slices` from that result, where
    neighbouring slices differ little.

    slices: (N, H, W) in [0, 1] of the query volume; support_image, support_mask: (H', W') of the other
    volume. verify_for(slices, seed, seed_mask) -> verify: the per-step check, built from the seed
    result (so against the query volume's own intensities). Returns (masks, probabilities) as
    `chain_segment`; all empty when the seed result is.
    """
    vol = np.asarray(slices, dtype=np.float32)
    thr = float(model.config.threshold if threshold is None else threshold)
    with torch.inference_mode():
        p0 = model.segment(vol[seed][None], np.asarray(support_image)[None], np.asarray(support_mask)[None],
                           threshold=thr, return_probs=True, align=align)[0].numpy()
    seed_mask = p0 > thr
    if not seed_mask.any():
        return np.zeros(vol.shape, dtype=bool), np.zeros(vol.shape, dtype=np.float32)
    verify = verify_for(vol, seed, seed_mask) if verify_for is not None else None
    masks, probs = chain_segment(model, vol, seed, seed_mask, threshold=thr, align=align, verify=verify)
    probs[seed] = np.where(seed_mask, p0, 0.0)
    return masks, probs
