"""Chained walks: each slice of a volume segmented from its neighbour's result.

The training episodes are near-slice pairs, so a one-slice step is the task the network learned.
From an annotated slice the walk goes outward one slice at a time, each result the next support; a
direction ends where the organ disappears (an empty result), so the walk also finds where the organ
ends. `chain` walks several organs / annotated slices of one stack at once with a step (the network's,
lib.pipeline.step, or registration's, lib.pipeline.register_step), every live direction of
every walk advancing in lockstep so that each round is one batch of `Step.pairs`; `seeded_chain`
starts a walk from a slice segmented from another volume. `verify(z, mask)` checks each result
before it is carried on (the app's intensity gate), so an error is not carried along the chain.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from lib.pipeline.step import Step, decided


@dataclass
class ChainWalk:
    """One walk over a stack (N, H, W): from slice `start` annotated with `mask` (H, W), outward in both
    directions inside slices lo..hi (hi None: the last); `verify` as in the module docstring."""

    start: int
    mask: np.ndarray
    verify: Callable | None = None
    lo: int = 0
    hi: int | None = None


def chain(step: Step, slices, walks: list[ChainWalk], min_pixels: int = 1,
          agreement: list | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Several walks over one stack (N, H, W) in [0, 1] at once with the network.

    A step whose mask has fewer than `min_pixels` pixels at network size ends that direction.
    agreement: a list that gets, per walk, float32 (N,): at each reached slice the Dice between the step's
    result and the support mask the network saw (registered onto the slice for an aligned model), 1 at
    `start`, NaN where not reached (lib.pipeline.confidence).
    -> per walk (masks bool (N, H, W), probabilities float32 (N, H, W)): row `start` is its mask, rows not
    reached are empty with probability 0; masks == probabilities > threshold (pixels `verify` removed
    have probability 0, pixels it added just above the threshold).
    """
    vol = np.ascontiguousarray(slices, dtype=np.float32)
    if vol.ndim != 3:
        raise ValueError(f"slices must be (N, H, W), got shape {tuple(vol.shape)}")
    n, h, w = vol.shape
    masks, probs, fronts, bounds = [], [], [], []
    for i, wk in enumerate(walks):
        lo, hi = int(wk.lo), n - 1 if wk.hi is None else int(wk.hi)
        if not 0 <= lo <= wk.start <= hi < n:
            raise ValueError(f"start slice {wk.start} is outside {lo}..{hi} (of 0..{n - 1})")
        seed = np.asarray(wk.mask, dtype=np.float32)
        if seed.shape != (h, w):
            raise ValueError(f"start mask {tuple(seed.shape)} differs from the slice size {(h, w)}")
        if not (seed > 0.5).any():
            raise ValueError("the start mask is empty: annotate the organ on the start slice")
        masks.append(np.zeros((n, h, w), dtype=bool))
        masks[i][wk.start] = seed > 0.5
        probs.append(np.zeros((n, h, w), dtype=np.float32))
        probs[i][wk.start] = masks[i][wk.start]
        bounds.append((lo, hi))
        fronts += [(i, d, wk.start) for d in (1, -1) if lo <= wk.start + d <= hi]   # (walk, direction, last z)
    agree = [np.full(n, np.nan, dtype=np.float32) for _ in walks]
    for a, wk in zip(agree, walks):
        a[wk.start] = 1.0
    while fronts:
        p, kept, seen = step.pairs(vol[[z + d for _, d, z in fronts]], vol[[z for _, _, z in fronts]],
                                   np.stack([masks[i][z] for i, _, z in fronts]), keep_pixels=min_pixels,
                                   supports=True)
        alive = []
        for (i, d, z), prob, ok, sup in zip(fronts, p, kept, seen):
            b = z + d
            if ok:
                out = prob > step.threshold
                if walks[i].verify is not None:
                    out = np.asarray(walks[i].verify(b, out), dtype=bool)
                probs[i][b] = decided(prob, out, step.threshold)
                masks[i][b] = out
            agree[i][b] = 2.0 * (masks[i][b] & sup).sum() / max(int(masks[i][b].sum() + sup.sum()), 1)
            if masks[i][b].any() and bounds[i][0] <= b + d <= bounds[i][1]:
                alive.append((i, d, b))
        fronts = alive
    if agreement is not None:
        agreement.extend(agree)
    return list(zip(masks, probs))


def seeded_chain(step: Step, slices, seed: int, support_image, support_mask,
                 verify_for: Callable | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Across volumes: slices[seed] is segmented from a support slice of another volume, then the walk
    goes on inside `slices` (N, H, W) from that result, where neighbouring slices differ little.

    support_image, support_mask: (H', W') of the other volume. verify_for(slices, seed, seed_mask) ->
    verify: the per-step check, built from the seed result (the query volume's own intensities).
    -> (masks, probabilities) as `chain`; all empty when the seed result is.
    """
    vol = np.asarray(slices, dtype=np.float32)
    p0 = step.shared(vol[seed][None], support_image, support_mask)[0]
    seed_mask = p0 > step.threshold
    if not seed_mask.any():
        return np.zeros(vol.shape, dtype=bool), np.zeros(vol.shape, dtype=np.float32)
    verify = verify_for(vol, seed, seed_mask) if verify_for is not None else None
    masks, probs = chain(step, vol, [ChainWalk(seed, seed_mask, verify)])[0]
    probs[seed] = np.where(seed_mask, p0, 0.0)
    return masks, probs
