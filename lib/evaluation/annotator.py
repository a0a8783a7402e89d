"""A simulated annotator on one volume: annotations drawn from the truth, the app's pipeline, scores.

The volume is cut (along z only) to the slices the benchmark organs span, so the walks do not go on
past them; every organ is annotated in one request, as an annotator draws them; each organ is scored
over its own extent (first..last organ slice, docs/evaluation.md's propagation mode).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lib.pipeline import propagate
from lib.pipeline.confidence import dice


@dataclass
class Case:
    """image float32 (H, W, Z) in [0, 1]; truth uint8 (H, W, Z) with only the organ ids; organs name ->
    id; extent id -> (first, last) organ slice; offset: z of slice 0 in the original volume."""

    case_id: int
    image: np.ndarray
    truth: np.ndarray
    organs: dict[str, int]
    extent: dict[int, tuple[int, int]]
    offset: int


def load_case(dataset, index: int) -> Case:
    """Volume `index` of an EvalDataset, cut to the organs' slices."""
    image, label, _ = dataset.load(index)
    organs = {name: lid for name, lid in dataset.organs.items() if dataset.slices[index][name]}
    lo = min(dataset.slices[index][n][0] for n in organs)
    hi = max(dataset.slices[index][n][-1] for n in organs)
    truth = np.zeros(label[..., lo:hi + 1].shape, dtype=np.uint8)
    for lid in organs.values():
        truth[label[..., lo:hi + 1] == lid] = lid
    extent = {}
    for lid in organs.values():
        zs = np.flatnonzero((truth == lid).any(axis=(0, 1)))
        extent[lid] = (int(zs[0]), int(zs[-1]))
    return Case(dataset.case_ids[index], image[..., lo:hi + 1], truth, organs, extent, lo)


def middle_slice(case: Case, lid: int) -> int:
    """The middle organ slice (docs/evaluation.md's propagation mode annotates it)."""
    zs = np.flatnonzero((case.truth == lid).any(axis=(0, 1)))
    return int(zs[len(zs) // 2])


def annotation(case: Case, chosen: dict[int, list[int]]) -> np.ndarray:
    """organ id -> slices -> the truth of those organs on those slices, uint8 (H, W, Z)."""
    out = np.zeros(case.truth.shape, dtype=np.uint8)
    for lid, zs in chosen.items():
        for z in zs:
            out[..., z] = np.where(case.truth[..., z] == lid, lid, out[..., z])
    return out


def segment(model, options, case: Case, chosen: dict[int, list[int]], cache: dict | None = None):
    """-> the app's PropagationResult for the annotation `chosen` (cache: propagate's walks_cache)."""
    return propagate(model, case.image, annotation(case, chosen), options, normalized=True, walks_cache=cache)


def organ_dice(case: Case, label: np.ndarray, lid: int) -> float:
    """Dice of one organ over its extent."""
    lo, hi = case.extent[lid]
    return dice(label[..., lo:hi + 1] == lid, case.truth[..., lo:hi + 1] == lid)


def slice_errors(case: Case, label: np.ndarray, lid: int) -> np.ndarray:
    """(Z,) wrong voxels (false positive + false negative) of one organ per slice, 0 outside its extent."""
    wrong = ((label == lid) != (case.truth == lid)).sum(axis=(0, 1)).astype(np.int64)
    lo, hi = case.extent[lid]
    wrong[:lo], wrong[hi + 1:] = 0, 0
    return wrong


def slice_dice(case: Case, label: np.ndarray, lid: int) -> np.ndarray:
    """(Z,) per-slice Dice of one organ (NaN where neither result nor truth has it)."""
    a, b = label == lid, case.truth == lid
    inter = (a & b).sum(axis=(0, 1))
    total = a.sum(axis=(0, 1)) + b.sum(axis=(0, 1))
    return np.where(total > 0, 2.0 * inter / np.maximum(total, 1), np.nan)


def draw_suggested(case: Case, lid: int, ranked: list[int], chosen: list[int]) -> tuple[int | None, int]:
    """The annotator's answer to the app's suggestions `ranked` (best first) for organ `lid`, annotated on
    `chosen`: the first suggested slice that shows the organ is drawn. On one that does not (the walk ran on
    past the organ's end), the annotator scrolls from it towards the nearest annotated slice and draws the
    first slice that shows the organ (the organ's last slice on that side), or, when that one is annotated
    already, looks at the next suggestion. -> (slice to draw or None, suggestions that did not show it)."""
    present = (case.truth == lid).any(axis=(0, 1))
    for i, z in enumerate(ranked):
        if present[z] and z not in chosen:
            return int(z), i
        near = min(chosen, key=lambda a: abs(a - z))
        d = 1 if near > z else -1
        y = z
        while y != near and not present[y]:
            y += d
        if y != near and y not in chosen:
            return int(y), i + 1
    return None, len(ranked)
