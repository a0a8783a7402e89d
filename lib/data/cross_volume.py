"""Cross-volume episodes: the support from one patient, the query from another (issue 18), from
images only.

A region of volume A (a supervoxel, grown by up to `merge` neighbours as within-volume episodes do)
is carried into volume B at the same relative position in the body: each volume's body box
(supervoxel id > 0) is mapped onto the unit cube (`align="box"`). The query mask is the union of B's
**own** supervoxels on the query slice that lie mostly (>= `cover`) inside the carried region, so the
target follows B's boundaries, not the carrying's. A 3D affine registration of the boxes
(`align="affine"`) carried the organs worse than the boxes alone and costs ~50 s a pair
(`python -m benchmarks.cross_volume`, docs/training.md). Each volume is paired with `partners` others
of its own dataset (modality); a pair's carried supervoxels are computed when first drawn.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from lib.data.episodes import EpisodeSampler, grow_region, make_episode
from lib.data.lru import LRU

REG_GRID = (64, 64, 32)     # (H, W, Z) of the "affine" registration grid
CARRY_ALIGNMENTS = ("box", "affine")   # benchmarks/cross_volume.py measures both against the labels


def _unit_box(array: np.ndarray, box, dtype) -> "sitk.Image":
    """(H, W, Z) array cut to `box` ((lo, hi) per axis) -> SimpleITK image spanning the unit cube, axes
    in SimpleITK's (x = W, y = H, z = Z) order."""
    import SimpleITK as sitk

    crop = array[tuple(slice(lo, hi) for lo, hi in box)].astype(dtype)
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(crop, (2, 0, 1))))   # (Z, H, W)
    img.SetSpacing([1.0 / crop.shape[1], 1.0 / crop.shape[0], 1.0 / crop.shape[2]])
    return img


def _unit_grid(size, pixel) -> "sitk.Image":
    """An empty (H, W, Z) = `size` grid spanning the unit cube (a resampling reference)."""
    import SimpleITK as sitk

    ref = sitk.Image([size[1], size[0], size[2]], pixel)
    ref.SetSpacing([1.0 / size[1], 1.0 / size[0], 1.0 / size[2]])
    return ref


def body_box(supervoxels: np.ndarray) -> list[tuple[int, int]]:
    """(H, W, Z) supervoxels -> [(lo, hi)] per axis of the body (id > 0); the whole volume if empty."""
    body = supervoxels > 0
    if not body.any():
        return [(0, n) for n in supervoxels.shape]
    out = []
    for axis in range(3):
        hit = np.flatnonzero(body.any(axis=tuple(a for a in range(3) if a != axis)))
        out.append((int(hit[0]), int(hit[-1]) + 1))
    return out


def register_volumes(moving: np.ndarray, moving_sv: np.ndarray, fixed: np.ndarray, fixed_sv: np.ndarray,
                     align: str = "box", labels: np.ndarray | None = None):
    """Volume A (moving) onto B (fixed), both (H, W, Z) in [0, 1] with their supervoxels -> a function
    carrying A's supervoxel ids (or `labels`, for measuring) onto B's grid: () -> (H_B, W_B, Z_B) uint16
    (nearest). align: "box" maps A's body box onto B's (the same relative body position); "affine"
    adds a 3D affine registration (correlation metric) of the boxes on a REG_GRID grid."""
    import SimpleITK as sitk

    if align not in CARRY_ALIGNMENTS:
        raise ValueError(f"unknown alignment {align!r}: choose one of {' | '.join(CARRY_ALIGNMENTS)}")
    box_m, box_f = body_box(moving_sv), body_box(fixed_sv)
    transform = sitk.AffineTransform(3)
    if align == "affine":
        m, f = (sitk.Resample(_unit_box(v, box, np.float32), _unit_grid(REG_GRID, sitk.sitkFloat32),
                              sitk.Transform(), sitk.sitkLinear, 0.0) for v, box in ((moving, box_m), (fixed, box_f)))
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsCorrelation()
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(0.25, seed=7)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetOptimizerAsRegularStepGradientDescent(0.01, 1e-4, 150, relaxationFactor=0.7)
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetShrinkFactorsPerLevel([2, 1])
        reg.SetSmoothingSigmasPerLevel([1, 0])
        reg.SetInitialTransform(sitk.CenteredTransformInitializer(
            f, m, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.GEOMETRY), inPlace=False)
        transform = reg.Execute(f, m)

    def carry() -> np.ndarray:
        lab_m = _unit_box(moving_sv if labels is None else labels, box_m, np.uint16)
        ref = _unit_grid([hi - lo for lo, hi in box_f], sitk.sitkUInt16)
        out = sitk.GetArrayFromImage(sitk.Resample(lab_m, ref, transform, sitk.sitkNearestNeighbor, 0))
        full = np.zeros(fixed_sv.shape, dtype=np.uint16)
        sl = tuple(slice(lo, hi) for lo, hi in box_f)
        full[sl] = np.transpose(out, (1, 2, 0))
        return full

    return carry


class CrossVolumeSampler:
    """Draws cross-volume episodes (module doc) on top of a within-volume `EpisodeSampler` (its volumes,
    candidates and region growing); `share` of `sample()` calls are cross-volume, the rest are the
    within-volume sampler's own.

    groups: per volume, the name of its dataset (only volumes of one group are paired).
    cover: share of a B supervoxel's slice area inside the carried region for it to join the target.
    keep: carried-label volumes kept in memory (least recently used dropped).
    """

    def __init__(self, within: EpisodeSampler, groups: Sequence[str], share: float = 0.5, partners: int = 3,
                 cover: float = 0.5, seed: int = 42, keep: int = 6, tries: int = 8, align: str = "box"):
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"cross-volume share must be in [0, 1], got {share}")
        self.within, self.share, self.cover, self.tries = within, float(share), float(cover), int(tries)
        self.align = align
        self.rng = np.random.default_rng(seed)
        usable = set(within.usable)
        self.pairs: list[tuple[int, int]] = []
        for v in sorted(usable):
            mates = [u for u in sorted(usable) if u != v and groups[u] == groups[v]]
            for u in self.rng.permutation(mates)[:partners]:
                self.pairs.append((v, int(u)))
        self._carriers: dict = {}
        self._boxes: dict[int, list[tuple[int, int]]] = {}
        self._carried = LRU(keep)
        self.drawn = {"cross": 0, "fallback": 0}

    def _carried_sv(self, a: int, b: int) -> np.ndarray:
        """A's supervoxel ids on B's grid (computed once per pair, kept while recently used)."""
        key = (a, b)
        if key not in self._carriers:
            (img_a, sv_a), (img_b, sv_b) = self.within.volume(a), self.within.volume(b)
            self._carriers[key] = register_volumes(img_a, sv_a, img_b, sv_b, self.align)
        return self._carried.get(key, self._carriers[key])

    def _box(self, v: int) -> list[tuple[int, int]]:
        """Volume v's body box (`body_box`), found once."""
        if v not in self._boxes:
            self._boxes[v] = body_box(self.within.volume(v)[1])
        return self._boxes[v]

    def sample(self) -> dict:
        if not self.pairs or self.rng.random() >= self.share:
            return self.within.sample()
        for _ in range(self.tries):
            ep = self._cross_episode()
            if ep is not None:
                self.drawn["cross"] += 1
                return ep
        self.drawn["fallback"] += 1
        return self.within.sample()

    def _cross_episode(self) -> dict | None:
        a, b = self.pairs[int(self.rng.integers(len(self.pairs)))]
        cands = self.within.candidates(a)
        k, zs = (int(x) for x in cands[self.rng.integers(len(cands))])
        img_a, sv_a = self.within.volume(a)
        steps = 0 if self.rng.random() < 0.5 else int(self.rng.integers(1, max(self.within.merge, 1) + 1))
        region = grow_region(sv_a[:, :, zs], k, steps, self.rng)
        carried = np.isin(self._carried_sv(a, b), region)                        # (H_B, W_B, Z_B)
        area = carried.reshape(-1, carried.shape[2]).sum(axis=0)
        # the query slice: B's slice at the support's relative position in the body, if the region got there
        box_a, box_b = self._box(a), self._box(b)
        rel = (zs - box_a[2][0]) / max(box_a[2][1] - box_a[2][0] - 1, 1)
        zq = int(round(box_b[2][0] + rel * (box_b[2][1] - box_b[2][0] - 1)))
        zq = int(np.clip(zq, 0, len(area) - 1))
        if area[zq] < self.within.min_area:
            zq = int(np.argmax(area))
            if area[zq] < self.within.min_area:
                return None
        img_b, sv_b = self.within.volume(b)
        ids, counts = np.unique(sv_b[:, :, zq], return_counts=True)
        inside = np.bincount(sv_b[:, :, zq][carried[:, :, zq]].ravel(), minlength=int(ids.max()) + 1)
        target = [int(i) for i, c in zip(ids, counts) if i > 0 and inside[i] >= self.cover * c]
        query_mask = np.isin(sv_b[:, :, zq], target)
        if query_mask.sum() < self.within.min_area:
            return None
        return {**make_episode(img_a, sv_a, a, k, region, zs, zs), "query_volume": b, "slices": (zs, zq),
                "query_image": np.asarray(img_b[:, :, zq], dtype=np.float32),
                "query_mask": query_mask.astype(np.float32)}

    __call__ = sample

    def __len__(self) -> int:
        """Within-volume candidate pairs (the cross-volume ones are drawn from the same supports)."""
        return len(self.within)

    def __iter__(self):
        while True:
            yield self.sample()
