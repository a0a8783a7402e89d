"""Per-slice confidence of a propagation and the slice to annotate next (numpy only).

Two estimates of every chained step come for free: the network's result and the support mask it
was given, registered onto the slice (an aligned model's `align_support`; the registration's own
estimate). Their Dice `agreement` is low where a step is hard (the organ changes shape, a neighbour
touches it); an error made there is carried on by every later step, so a slice's confidence is the
product of the agreements on the walk from its annotated slice to it (`cumulative`). Without
agreements (per-slice segmentation, a model without aligned supports) the confidence is the mean
certainty |2p - 1| of the probabilities on the slice's organ pixels. docs/app.md ("Confidence and the
slice to annotate next") gives the measurements behind the choice (benchmarks/confidence.py).
"""
from __future__ import annotations

import numpy as np


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two bool masks of one shape; two empty masks agree (1.0)."""
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int(np.logical_and(a, b).sum()) / total if total else 1.0


def cumulative(agreement: np.ndarray, source: np.ndarray) -> np.ndarray:
    """agreement (Z,) per-step Dice (NaN: not reached), source (Z,) the annotated slice serving each
    slice (-1: none) -> (Z,) product of the agreements from the source to each slice (NaN where the walk
    did not reach it or its source is -1; 1 at annotated slices)."""
    agreement = np.asarray(agreement, dtype=np.float64)
    source = np.asarray(source, dtype=np.int64)
    out = np.full(agreement.shape, np.nan)
    for s in np.unique(source[source >= 0]):
        for d in (1, -1):
            acc, z = 1.0, int(s)
            out[z] = 1.0
            z += d
            while 0 <= z < len(out) and source[z] == s and np.isfinite(agreement[z]):
                acc *= agreement[z]
                out[z] = acc
                z += d
    return out


def certainty(probs: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """probs float (Z, H, W), mask bool (Z, H, W) -> (Z,) mean |2p - 1| over each slice's mask pixels
    (NaN on slices with an empty mask)."""
    p = np.abs(2.0 * np.asarray(probs, dtype=np.float32) - 1.0)
    area = mask.reshape(len(mask), -1).sum(axis=1)
    total = np.where(mask, p, 0.0).reshape(len(mask), -1).sum(axis=1)
    return np.where(area > 0, total / np.maximum(area, 1), np.nan)


def slice_confidence(probs: np.ndarray, mask: np.ndarray, agreement: np.ndarray | None,
                     source: np.ndarray) -> np.ndarray:
    """One organ's confidence per slice, float (Z,) in [0, 1]; NaN where the organ is neither
    predicted nor annotated. probs / mask (Z, H, W); agreement (Z,) or None; source (Z,) as `cumulative`."""
    mask = np.asarray(mask, dtype=bool)
    present = mask.reshape(len(mask), -1).any(axis=1)
    conf = certainty(probs, mask)
    if agreement is not None and np.isfinite(agreement).any():
        walked = cumulative(agreement, source)
        conf = np.where(np.isfinite(walked), walked, conf)   # slices no walk of its own reached: certainty
    conf = np.where(np.asarray(source) == np.arange(len(mask)), 1.0, conf)   # annotated slices
    return np.where(present, np.clip(conf, 0.0, 1.0), np.nan)


def expected_gain(confidence: np.ndarray, area: np.ndarray, source: np.ndarray) -> np.ndarray:
    """(Z,) expected wrong voxels an annotation of each slice would remove. confidence (Z,), area (Z,)
    predicted pixels, source (Z,) the annotated slice serving each slice (-1: none).

    Annotated, slice z serves the slices of its walk beyond it (confidence c(y) / c(z): the walk now starts
    at z) and those between it and its source that are nearer to it (c(z) / c(y): the same steps, walked
    back); each gains area x (new - old confidence). A slice without a source gains its own
    (1 - confidence) x area. Favours slices inside a long uncertain run over its far end."""
    c = np.clip(np.nan_to_num(np.asarray(confidence, dtype=np.float64), nan=1.0), 1e-6, 1.0)
    area = np.asarray(area, dtype=np.float64)
    src = np.asarray(source, dtype=np.int64)
    y = np.arange(len(c))
    gain = (1.0 - c) * area
    for z in np.flatnonzero((src >= 0) & (src != y)):
        s, d = src[z], np.sign(z - src[z])
        served = src == s
        far = served & ((y - z) * d > 0)
        near = served & ((y - s) * d > 0) & ((z - y) * d > 0) & (np.abs(y - z) < np.abs(y - s))
        new = np.where(far, c / c[z], np.where(near, c[z] / c, c))
        gain[z] += float((area * (np.minimum(new, 1.0) - c))[far | near].sum())
    return gain


def next_slices(confidence: np.ndarray, mask: np.ndarray, annotated, source: np.ndarray | None = None,
                presence: float = 0.5, end: float = 0.5, k: int = 3) -> list[int]:
    """Up to k slices to annotate next for one organ, best first: the most `expected_gain` (without
    `source`: the most expected wrong voxels, (1 - confidence) x predicted area), among the predicted
    slices not annotated yet where the organ is likely to be (an annotation can only be drawn there, and
    chained walks run on past organ ends): area at least `presence` x that of the annotated slice serving
    them (`source` (Z,); None or -1: the largest predicted area), and not beyond an outermost annotated
    slice smaller than `end` x the largest annotated one (an organ's end, drawn). The later ones are for a
    first slice that turns out not to show the organ. confidence (Z,), mask bool (Z, H, W)."""
    area = np.asarray(mask, dtype=bool).reshape(len(mask), -1).sum(axis=1).astype(np.float64)
    if area.size == 0 or area.max() == 0:
        return []
    z = np.arange(len(area))
    src = np.full(len(area), -1) if source is None else np.asarray(source)
    ref = np.where(src >= 0, area[np.clip(src, 0, None)], area.max())
    score = expected_gain(confidence, area, src)
    score[~np.isfinite(confidence) | (area == 0)] = 0.0
    score[area < presence * ref] = -1.0
    ann = np.sort(np.asarray(list(annotated), dtype=np.int64))
    if ann.size:
        score[ann] = -1.0
        small = area[ann] < end * area[ann].max()
        score[(z < ann[0]) & small[0]] = -1.0
        score[(z > ann[-1]) & small[-1]] = -1.0
    order = np.lexsort((np.abs(z - np.where(src >= 0, src, 0)), -np.round(score, 6)))
    return [int(i) for i in order[:k] if score[i] > 0]   # ties: the slice nearer its annotated slice


def next_slice(confidence, mask, annotated, source=None, presence: float = 0.5) -> int | None:
    """The best of `next_slices`, or None."""
    best = next_slices(confidence, mask, annotated, source, presence, k=1)
    return best[0] if best else None
