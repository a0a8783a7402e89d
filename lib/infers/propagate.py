"""Annotation propagation: a few annotated slices -> a 3D multi-organ label (numpy / torch only).

Volumes are (H, W, Z) arrays, Z (the last axis) is the slice axis. Every non-zero annotation value
is an organ, segmented 1-way with its own support and merged into one uint8 label map.
No monailabel import here, so this is testable on its own.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from lib.model.chain import ChainWalk, chain_segment_many, seeded_chain
from lib.model.sdfsmis import resize_mask, resize_slices
from lib.transforms import normalize_volume
from lib.transforms.align import support_aligner
from lib.transforms.postprocess import chain_gate, intensity_gate

MERGE_RULES = ("probability", "order")


class AnnotationError(ValueError):
    """An image or annotation the propagation cannot use (the app answers HTTP 400 with the message)."""


# ---- validation ------------------------------------------------------------------------------
def check_volume(image, name: str = "image") -> np.ndarray:
    """A 3D volume with at least 2 slices on the last axis -> float32 (H, W, Z)."""
    arr = np.asarray(image)
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3 or arr.shape[-1] < 2:
        raise AnnotationError(
            f"{name} has shape {tuple(arr.shape)}: SD-FSMIS needs a 3D volume (H, W, Z) with at least 2 slices "
            "(2D images are not supported)"
        )
    return arr.astype(np.float32, copy=False)


def check_annotation(label, shape, name: str = "annotation") -> np.ndarray:
    """A label map of `shape` with non-negative integer values 0-255, not all zero -> uint8 (H, W, Z)."""
    arr = np.asarray(label)
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if tuple(arr.shape) != tuple(shape):
        raise AnnotationError(f"{name} shape {tuple(arr.shape)} differs from the image shape {tuple(shape)}")
    if arr.dtype.kind == "b":
        arr = arr.astype(np.uint8)
    if arr.dtype.kind not in "biuf":
        raise AnnotationError(f"{name} has non-numeric values (dtype {arr.dtype})")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or not np.all(np.mod(arr, 1) == 0):
            raise AnnotationError(f"{name} has non-integer values: label values must be whole numbers 0-255")
    if arr.min() < 0:
        raise AnnotationError(f"{name} has negative values (min {arr.min()}): label values must be 0-255")
    if arr.max() > 255:
        raise AnnotationError(f"{name} has values above 255 (max {arr.max()}): label values must be 0-255")
    if not arr.any():
        raise AnnotationError(f"{name} is empty (all zero): annotate the organ on at least one slice")
    return arr.astype(np.uint8)


# ---- slice bookkeeping -----------------------------------------------------------------------
def organ_values(label: np.ndarray) -> list[int]:
    """Sorted non-zero values of a label map: one organ each."""
    return [int(v) for v in np.unique(label) if v != 0]


def annotated_slices(mask: np.ndarray) -> np.ndarray:
    """(H, W, Z) -> the z indices of the slices with any non-zero voxel."""
    return np.flatnonzero(np.asarray(mask).reshape(-1, mask.shape[-1]).any(axis=0))


def nearest_slices(query_z, support_z, n_query: int, n_support: int | None = None) -> np.ndarray:
    """For each query slice index, the nearest support slice index.

    Same volume (n_support None or == n_query): nearest by index. Another volume: nearest by relative
    position z / (n - 1) along the slice axis. Ties go to the lower support index.
    """
    query_z = np.asarray(query_z, dtype=np.int64)
    support_z = np.asarray(support_z, dtype=np.int64)
    if support_z.size == 0:
        raise AnnotationError("no annotated support slice")
    if n_support is None or n_support == n_query:
        qpos, spos = query_z.astype(np.float64), support_z.astype(np.float64)
    else:
        qpos = query_z / max(n_query - 1, 1)
        spos = support_z / max(n_support - 1, 1)
    dist = np.abs(qpos[:, None] - spos[None, :])
    return support_z[np.argmin(dist, axis=1)]


def _slices(volume: np.ndarray, z) -> np.ndarray:
    """(H, W, Z) volume, indices -> (N, H, W)."""
    return np.moveaxis(volume[..., np.atleast_1d(z)], -1, 0)


# ---- propagation -----------------------------------------------------------------------------
@dataclass
class PropagationResult:
    """label: uint8 (H, W, Z); support: organ value -> support slice indices used; copied: z copied as is."""

    label: np.ndarray
    organs: list[int]
    support: dict[int, list[int]] = field(default_factory=dict)
    copied: list[int] = field(default_factory=list)
    forward_passes: int = 0
    seconds: float = 0.0


def propagate(
    model,
    image,
    support_label,
    support_image=None,
    batch_size: int = 8,
    threshold: float | None = None,
    merge: str = "probability",
    normalized: bool = False,
    chain: bool = False,
    gate: bool = False,
) -> PropagationResult:
    """Segment every organ of `support_label` in `image`.

    image: (H, W, Z) query volume. support_label: label map on the support volume, (H', W', Z').
    support_image: the support volume (H', W', Z'); None = `image` itself (propagation inside one volume:
        the annotated slices are copied into the result unchanged and every other slice is predicted).
    Each query slice uses, per organ, the nearest slice annotated with that organ (one support encoding
    per organ and support slice, queries in batches of `batch_size`).
    chain: inside one volume, walk slice by slice outward from each annotated slice instead, each result
        the next support (lib.model.chain); a walk ends where the organ disappears. Across volumes, the
        query slice at the support slice's relative position is segmented from the support, and the walk
        starts there (`seeded_chain`).
    gate: keep only predicted pixels in the organ's intensity range, and drop slices where little of
        the mask is left (lib.transforms.postprocess.intensity_gate). Inside one volume the range is the
        annotation's; chained, every step is gated before it becomes the next support. Across volumes it
        is applied only in a chain, against the seed result in the query volume itself: each volume has
        its own intensity scale (gating against the support cost 10 Dice points on Abd-CT).
    A model whose config has `align_support = "registration"` gets every support registered onto its
    query slice first (lib.transforms.align), as it was trained.
    merge: "probability" (a voxel above threshold for several organs gets the most probable one; equal
        probabilities go to the later organ) or "order" (later organ values overwrite earlier ones).
    normalized: the volumes are already scaled to [0, 1] (else lib.transforms.normalize_volume).
    """
    if merge not in MERGE_RULES:
        raise ValueError(f"unknown merge rule {merge!r}: choose one of {' | '.join(MERGE_RULES)}")
    start = time.perf_counter()
    query = check_volume(image, "image")
    same_volume = support_image is None
    support = query if same_volume else check_volume(support_image, "support image")
    label = check_annotation(support_label, support.shape, "annotation" if same_volume else "support annotation")
    if not normalized:
        query = normalize_volume(query)
        support = query if same_volume else normalize_volume(support)
    thr = float(model.config.threshold if threshold is None else threshold)
    size = model.config.image_size
    h, w, n_query = query.shape
    organs = organ_values(label)

    copied = annotated_slices(label).tolist() if same_volume else []
    query_z = np.setdiff1d(np.arange(n_query), copied)
    out = np.zeros(query.shape, dtype=np.uint8)
    best = np.full(query.shape, -1.0, dtype=np.float32) if merge == "probability" and len(organs) > 1 else None
    result = PropagationResult(out, organs, copied=copied)
    step = max(1, int(batch_size))

    aligner = support_aligner(getattr(model.config, "align_support", "none"))
    align = aligner.align if aligner is not None else None
    walks = []   # chained inside one volume: (organ, targets, support z, ChainWalk), all walked at once below
    stack = np.ascontiguousarray(np.moveaxis(query, -1, 0)) if chain and same_volume else None

    def paint(value: int, zs: np.ndarray, probs: np.ndarray, z_s: int, gated: bool = False) -> None:
        """probs (H, W, len(zs)) of organ `value` on slices zs, support slice z_s -> out (and best)."""
        fg = probs > thr
        if gate and same_volume and not gated:
            fg = np.moveaxis(intensity_gate(_slices(query, zs), np.moveaxis(fg, -1, 0), _slices(support, z_s),
                                            _slices(label, z_s) == value), 0, -1)
        if best is not None:
            fg &= probs >= best[..., zs]
            best[..., zs] = np.where(fg, probs, best[..., zs])
        block = out[..., zs]
        block[fg] = value
        out[..., zs] = block

    for value in organs:
        mask = label == value
        support_z = annotated_slices(mask)
        result.support[value] = support_z.tolist()
        if query_z.size == 0:
            continue
        assign = nearest_slices(query_z, support_z, n_query, None if same_volume else support.shape[-1])
        for z_s in np.unique(assign):
            targets = query_z[assign == z_s]
            if chain and same_volume:
                lo, hi = int(min(targets.min(), z_s)), int(max(targets.max(), z_s))
                verify = chain_gate(stack, int(z_s), mask[..., z_s]) if gate else None
                walks.append((value, targets, z_s, ChainWalk(int(z_s), mask[..., z_s], verify, lo, hi)))
                result.forward_passes += hi - lo
                continue
            if chain:                         # across volumes: one slice from the support, then a walk
                lo, hi = int(targets.min()), int(targets.max())
                rel = np.abs(targets / max(n_query - 1, 1) - z_s / max(support.shape[-1] - 1, 1))
                seed = int(targets[np.argmin(rel)]) - lo
                _, probs = seeded_chain(model, np.moveaxis(query[..., lo:hi + 1], -1, 0), seed,
                                        support[..., z_s], mask[..., z_s], threshold=thr, align=align,
                                        verify_for=chain_gate if gate else None)
                result.forward_passes += hi - lo + 1
                paint(value, targets, np.moveaxis(probs[targets - lo], 0, -1), z_s, gated=True)
                continue
            if align is not None:
                s_img, s_mask = _slices(support, z_s)[0], _slices(mask, z_s)[0]
                for i in range(0, targets.size, step):
                    zs = targets[i:i + step]
                    probs = model.segment(_slices(query, zs), s_img[None], s_mask[None], batch_size=step,
                                          threshold=thr, return_probs=True, align=align).numpy()   # (B, H, W)
                    result.forward_passes += 1
                    paint(value, zs, np.moveaxis(probs, 0, -1), z_s)
                continue
            s_img = resize_slices(_slices(support, z_s), size)
            s_mask = resize_mask(_slices(mask, z_s).astype(np.float32), size)
            cache = model.encode_support(s_img, s_mask.float())
            for i in range(0, targets.size, step):
                zs = targets[i:i + step]
                probs = model.predict(resize_slices(_slices(query, zs), size), cache)       # (B, 1, S, S)
                probs = resize_slices(probs.float().cpu(), (h, w))[:, 0].numpy()            # (B, H, W)
                result.forward_passes += 1
                paint(value, zs, np.moveaxis(probs, 0, -1), z_s)
    if walks:
        runs = chain_segment_many(model, stack, [wk for *_, wk in walks], threshold=thr, align=align)
        for (value, targets, z_s, _), (_, probs) in zip(walks, runs):
            paint(value, targets, np.moveaxis(probs[targets], 0, -1), z_s, gated=True)
    if copied:
        out[..., copied] = label[..., copied]
    result.seconds = time.perf_counter() - start
    return result
