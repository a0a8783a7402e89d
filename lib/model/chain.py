"""Chained propagation: each slice of a volume is segmented from its neighbour's result.

The training episodes are near-slice pairs, so a one-slice step is the task the network learned.
Starting at an annotated slice, the chain walks outward one slice at a time, each result becoming the
next support; a direction ends where the organ disappears (an empty result), so the chain also finds
where the organ ends. `walk` is the walk itself, for any step (registration in the evaluation's
baseline); `chain_segment_many` walks several organs at once with the network, both directions of each
in lockstep, so that every round is one network batch; `seeded_chain` starts a walk from a slice
segmented from another volume.

Two hooks keep this module free of SimpleITK and scipy: `align` warps the previous slice and its mask
onto the next one before the network sees them (lib.transforms.align, the `mini` model's
`align_support`), and `verify` checks each result before it becomes the next support (the app's
intensity gate, lib.transforms.postprocess), so that an error is not carried along the chain.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

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


@dataclass
class ChainWalk:
    """One chained walk over a stack (N, H, W): from slice `start`, annotated with `mask` (H, W), outward
    in both directions inside slices lo..hi (hi None: the last); verify(z, mask bool (H, W)) -> mask
    checks each result before it is carried on (None: no check)."""

    start: int
    mask: np.ndarray
    verify: Callable | None = None
    lo: int = 0
    hi: int | None = None


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
    Both directions advance together, one network batch per step (`chain_segment_many`).
    """
    return next(chain_segment_many(model, slices, [ChainWalk(start, start_mask, verify)], threshold, min_pixels,
                                   align))


@torch.inference_mode()
def chain_segment_many(model, slices, walks: list[ChainWalk], threshold: float | None = None,
                       min_pixels: int = 1, align: Callable | None = None, batch_size: int = 8,
                       ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Several walks over one stack at once (e.g. every organ of a volume), as `chain_segment` each.

    slices: (N, H, W) in [0, 1]. All walks advance in lockstep, both directions of each: the steps of
    one round (one per live direction, up to `batch_size` at a time) go through the network as one
    batch of 1-shot supports (`model.encode_supports`; a batch of one uses `model.encode_support`),
    so a step's result does not depend on which other steps share its batch (up to float rounding).
    The walks run when this is called; it returns an iterator of one (masks bool (N, H, W),
    probabilities float32 (N, H, W)) per walk, rows outside its lo..hi and rows not reached empty,
    built one walk at a time (until then only the visited slices are kept).
    """
    vol = np.ascontiguousarray(slices, dtype=np.float32)
    if vol.ndim != 3:
        raise ValueError(f"slices must be (N, H, W), got shape {tuple(vol.shape)}")
    n, h, w = vol.shape
    thr = float(model.config.threshold if threshold is None else threshold)
    masks, probs, fronts = [], [], []
    for i, wk in enumerate(walks):
        lo, hi = int(wk.lo), n - 1 if wk.hi is None else int(wk.hi)
        if not 0 <= lo <= wk.start <= hi < n:
            raise ValueError(f"start slice {wk.start} is outside {lo}..{hi} (of 0..{n - 1})")
        seed = np.asarray(wk.mask, dtype=np.float32)
        if seed.shape != (h, w):
            raise ValueError(f"start_mask {tuple(seed.shape)} differs from the slice size {(h, w)}")
        if not (seed > 0.5).any():
            raise ValueError("the start mask is empty: annotate the organ on the start slice")
        masks.append({wk.start: seed > 0.5})                      # visited slices only: z -> (H, W)
        probs.append({wk.start: (seed > 0.5).astype(np.float32)})
        fronts += [(i, d, wk.start) for d in (1, -1) if lo <= wk.start + d <= hi]   # (walk, direction, last z)
    while fronts:
        steps = [(i, z, z + d) for i, d, z in fronts]
        outs = []
        for k in range(0, len(steps), max(1, batch_size)):
            chunk = steps[k:k + max(1, batch_size)]
            outs += _network_steps(model, vol, [(a, b, masks[i][a]) for i, a, b in chunk], thr, min_pixels, align)
        alive = []
        for (i, d, z), (prob, out) in zip(fronts, outs):
            b = z + d
            if prob is not None:
                if walks[i].verify is not None:
                    out = np.asarray(walks[i].verify(b, out), dtype=bool)
                probs[i][b] = np.where(out, np.maximum(prob, np.nextafter(np.float32(thr), np.float32(1))), 0.0)
            masks[i][b] = out
            lo, hi = int(walks[i].lo), n - 1 if walks[i].hi is None else int(walks[i].hi)
            if masks[i][b].any() and lo <= b + d <= hi:
                alive.append((i, d, b))
        fronts = alive
    return (_dense((n, h, w), m, p) for m, p in zip(masks, probs))


def _dense(shape, masks: dict, probs: dict) -> tuple[np.ndarray, np.ndarray]:
    """{z: (H, W)} of the visited slices -> (masks bool (N, H, W), probabilities float32 (N, H, W))."""
    out_m, out_p = np.zeros(shape, dtype=bool), np.zeros(shape, dtype=np.float32)
    for z, m in masks.items():
        out_m[z] = m
    for z, p in probs.items():
        out_p[z] = p
    return out_m, out_p


def _network_steps(model, vol: np.ndarray, steps, thr: float, min_pixels: int, align: Callable | None):
    """Steps (a, b, bool mask of slice a (H, W)) -> per step (probability (H, W) float32 or None when
    fewer than `min_pixels` pixels pass at network size, mask bool (H, W) = probability > thr)."""
    n, h, w = vol.shape
    size = model.config.image_size
    supports = [(vol[a], m) if align is None else align(vol[b], vol[a], m) for a, b, m in steps]
    s_img = resize_slices(np.stack([s[0] for s in supports]), size)
    s_full = np.stack([np.asarray(s[1], np.float32) for s in supports])
    s_mask = resize_mask(s_full, size).float()
    cache = model.encode_support(s_img, s_mask) if len(steps) == 1 else model.encode_supports(s_img, s_mask)
    p = model.predict(resize_slices(vol[[b for _, b, _ in steps]], size), cache).float().cpu()   # (B, 1, S, S)
    keep = (p > thr).flatten(1).sum(dim=1) >= min_pixels
    if not keep.any():
        return [(None, np.zeros((h, w), dtype=bool))] * len(steps)
    prob = resize_slices(p, (h, w))[:, 0].numpy()
    if getattr(model.config, "edit_prior", False):     # apply_prior_edits: the model's inference default
        prior = resize_slices(model.decode_prior(cache).float().cpu(), (h, w))[:, 0].numpy()
        prob = apply_prior_edits(prob, prior, s_full, thr)
    return [(prob[j], prob[j] > thr) if keep[j] else (None, np.zeros((h, w), dtype=bool))
            for j in range(len(steps))]


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
