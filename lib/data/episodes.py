"""Self-supervised 1-way 1-shot episodes from supervoxels (ADNet/RPT rule).

Each draw: a random volume -> a random supervoxel -> two adjacent slices z, z+1 where that
supervoxel covers at least `min_area` pixels in both -> swapped with p=0.5 -> the first slice is
the support, the second the query, and both masks are that supervoxel.

Multi-scale regions (`merge` > 0, not in ADNet/RPT): half of the episodes keep the single supervoxel,
the other half grow it by m ~ U{1..merge} supervoxels, each a random in-slice neighbour of the region so far (on the support slice), and both
masks are that union, so that episodes also show organ-sized regions (a liver spans many supervoxels).

Ending regions (`vanish` > 0, not in ADNet/RPT): that share of the episodes pairs a slice where a
supervoxel covers >= `min_area` px with an adjacent slice where it (nearly) ends, < min_area / 4 px;
the query mask is then (nearly) empty, so the network learns that an organ can stop, as it does at
both ends of its extent (always-present pairs teach it to copy the support forever).

Distant slices (`gap` > 1, not in ADNet/RPT): the query slice is g ~ U{1..gap} slices away from
the support in the pair's direction, as far as the supervoxel still covers >= `min_area` px on
every slice in between (so a short supervoxel gives a shorter step). Adjacent slices differ little,
so they teach little more than copying; propagation asks for slices many steps away.

Setting 2 (no exposure to the test organs) removes training slices using ground-truth labels:
- `strict`: drop every slice that contains ANY test organ (the stated intent of Setting 2);
- `rpt`:    drop only slices that contain ALL test organs at once, which is what RPT's (and ADNet's)
            code does (`exclude_idx = exclude_idx & (np.sum(gt == c, axis=(1, 2)) > 0)` over classes).
A candidate pair that uses an excluded slice is never drawn.
"""
from __future__ import annotations

from typing import Callable, Sequence, Union

import numpy as np

from lib.data.lru import LRU

MIN_AREA = 200  # pixels of the supervoxel in each of the two slices (ADNet/RPT `min_size`)
SETTING2_RULES = ("strict", "rpt")

VolumeItem = Union[tuple, Callable[[], tuple]]  # (image (H, W, Z) in [0, 1], supervoxels (H, W, Z)) or loader


def excluded_slices(label, exclude_labels: Sequence[int], rule: str = "strict") -> np.ndarray:
    """label (H, W, Z) int -> bool (Z,): the slices Setting 2 removes.

    rule "strict": slices containing any of `exclude_labels`; "rpt": slices containing all of them.
    """
    if rule not in SETTING2_RULES:
        raise ValueError(f"unknown Setting 2 rule {rule!r}; valid: {', '.join(SETTING2_RULES)}")
    label = np.asarray(label)
    if label.ndim != 3:
        raise ValueError(f"expected a 3D label volume (H, W, Z), got shape {label.shape}")
    ids = [int(c) for c in exclude_labels]
    if not ids:
        return np.zeros(label.shape[2], dtype=bool)
    present = np.stack([(label == c).any(axis=(0, 1)) for c in ids])  # (n_ids, Z)
    return present.any(axis=0) if rule == "strict" else present.all(axis=0)


def slice_areas(supervoxels) -> np.ndarray:
    """supervoxels (H, W, Z) labels 0..K -> int64 (K + 1, Z): pixels of each label in each slice."""
    sv = np.asarray(supervoxels)
    if sv.ndim != 3:
        raise ValueError(f"expected 3D supervoxels (H, W, Z), got shape {sv.shape}")
    if sv.size and sv.min() < 0:
        raise ValueError("supervoxel labels must be >= 0")
    n_z = sv.shape[2]
    n_lab = int(sv.max()) + 1 if sv.size else 1
    key = sv.astype(np.int64) * n_z + np.arange(n_z, dtype=np.int64)  # broadcast over the last axis
    return np.bincount(key.ravel(), minlength=n_lab * n_z).reshape(n_lab, n_z)


def grow_region(labels2d: np.ndarray, seed: int, steps: int, rng: np.random.Generator) -> list[int]:
    """labels2d (H, W) ints, a label id -> [seed, + up to `steps` ids], each one a random label
    touching (4-neighbourhood) the region grown so far; background 0 is never added."""
    region = [int(seed)]
    inside = labels2d == seed
    for _ in range(steps):
        ring = np.zeros_like(inside)
        ring[1:] |= inside[:-1]
        ring[:-1] |= inside[1:]
        ring[:, 1:] |= inside[:, :-1]
        ring[:, :-1] |= inside[:, 1:]
        near = np.setdiff1d(np.unique(labels2d[ring & ~inside]), [0, *region])
        if not near.size:
            break
        nxt = int(rng.choice(near))
        region.append(nxt)
        inside |= labels2d == nxt
    return region


def valid_pairs(supervoxels, min_area: int = MIN_AREA, excluded=None, areas=None) -> np.ndarray:
    """int64 (N, 2) rows (supervoxel id, z): the id covers >= `min_area` px in slices z and z+1,
    and neither slice is `excluded` (bool (Z,)). Sorted by id, then z.
    areas: `slice_areas(supervoxels)` when the caller has it already."""
    areas = (slice_areas(supervoxels) if areas is None else areas)[1:]  # (K, Z), background dropped
    ok = areas >= min_area
    if excluded is not None:
        excluded = np.asarray(excluded, dtype=bool)
        if excluded.shape != (ok.shape[1],):
            raise ValueError(f"excluded must be bool ({ok.shape[1]},), got shape {excluded.shape}")
        ok &= ~excluded[None, :]
    pair_ok = ok[:, :-1] & ok[:, 1:]
    rows = np.argwhere(pair_ok).astype(np.int64)
    rows[:, 0] += 1  # back to supervoxel ids
    return rows


def ending_pairs(supervoxels, min_area: int = MIN_AREA, excluded=None, areas=None) -> np.ndarray:
    """int64 (N, 3) rows (supervoxel id, support z, query z): adjacent slices where the id covers
    >= `min_area` px on the support slice and < min_area / 4 px (possibly none) on the query slice;
    neither slice `excluded`. Sorted by id, then support z. areas: as in `valid_pairs`."""
    areas = (slice_areas(supervoxels) if areas is None else areas)[1:]
    ok, gone = areas >= min_area, areas * 4 < min_area
    if excluded is not None:
        keep = ~np.asarray(excluded, dtype=bool)[None, :]
        ok, gone = ok & keep, gone & keep
    up = np.argwhere(ok[:, :-1] & gone[:, 1:])          # support z, query z + 1
    down = np.argwhere(gone[:, :-1] & ok[:, 1:])        # support z + 1, query z
    rows = np.concatenate([np.stack([up[:, 0], up[:, 1], up[:, 1] + 1], 1),
                           np.stack([down[:, 0], down[:, 1] + 1, down[:, 1]], 1)]).astype(np.int64)
    rows[:, 0] += 1
    return rows[np.lexsort((rows[:, 1], rows[:, 0]))] if len(rows) else rows.reshape(0, 3)


def make_episode(image, sv, v: int, k: int, region: list[int], zs: int, zq: int) -> dict:
    """The episode dict (EpisodeSampler doc): slices zs (support) and zq (query), masks = `region` ids."""
    return {
        "support_image": np.asarray(image[:, :, zs], dtype=np.float32),
        "support_mask": np.isin(sv[:, :, zs], region).astype(np.float32),
        "query_image": np.asarray(image[:, :, zq], dtype=np.float32),
        "query_mask": np.isin(sv[:, :, zq], region).astype(np.float32),
        "volume_index": v,
        "supervoxel": k,
        "region": region,
        "slices": (zs, zq),
    }


class EpisodeSampler:
    """Draws episodes from supervoxel pseudo-labels; deterministic for a seed.

    volumes: sequence of (image (H, W, Z) float in [0, 1], supervoxels (H, W, Z) int) tuples, or of
        zero-argument callables returning such a tuple (loaded at construction to find the
        candidates, then again when drawn; at most `max_loaded` loaded volumes are kept, None = all).
    labels / exclude_labels / setting2_rule: Setting 2 (see module doc); `labels` is a sequence of
        ground-truth volumes (H, W, Z) or callables, aligned with `volumes`.

    merge: grow each region by up to this many neighbouring supervoxels (module doc; 0 = ADNet/RPT).
    vanish: share of episodes whose query slice is where the supervoxel ends (module doc; 0 = ADNet/RPT).
    gap: largest support-query slice distance (module doc; 1 = adjacent slices, ADNet/RPT).

    `sample()` returns a dict: support_image, support_mask, query_image, query_mask (each float32
    (H, W); masks in {0, 1}), volume_index, supervoxel, region (the supervoxel ids of the masks),
    slices (support z, query z).
    """

    def __init__(
        self,
        volumes: Sequence[VolumeItem],
        seed: int = 42,
        min_area: int = MIN_AREA,
        labels: Sequence | None = None,
        exclude_labels: Sequence[int] | None = None,
        setting2_rule: str = "strict",
        max_loaded: int | None = None,
        merge: int = 0,
        vanish: float = 0.0,
        gap: int = 1,
    ):
        self._items = list(volumes)
        if not self._items:
            raise ValueError("EpisodeSampler needs at least one volume")
        if setting2_rule not in SETTING2_RULES:
            raise ValueError(f"unknown Setting 2 rule {setting2_rule!r}; valid: {', '.join(SETTING2_RULES)}")
        if exclude_labels is not None and labels is None:
            raise ValueError("Setting 2 (exclude_labels) needs the ground-truth label volumes (labels=...)")
        if labels is not None and len(labels) != len(self._items):
            raise ValueError(f"{len(labels)} label volumes for {len(self._items)} volumes")
        self.min_area = int(min_area)
        if merge < 0:
            raise ValueError(f"merge must be >= 0, got {merge}")
        self.merge = int(merge)
        if not 0.0 <= vanish < 1.0:
            raise ValueError(f"vanish must be in [0, 1), got {vanish}")
        self.vanish = float(vanish)
        if gap < 1:
            raise ValueError(f"gap must be >= 1, got {gap}")
        self.gap = int(gap)
        self._present: list[np.ndarray] = []  # bool (K + 1, Z) per volume when gap > 1: id covers >= min_area
        self._endings: list[np.ndarray] = []  # (M_v, 3) (supervoxel id, support z, query z) per volume
        self.setting2_rule = setting2_rule
        self.exclude_labels = None if exclude_labels is None else [int(c) for c in exclude_labels]
        self._loaded = LRU(None if max_loaded is None else max(1, max_loaded))   # v -> (image, supervoxels)
        self.rng = np.random.default_rng(seed)

        self.excluded: list[np.ndarray] = []  # bool (Z,) per volume
        self._cands: list[np.ndarray] = []  # (N_v, 2) (supervoxel id, z) per volume
        self._sv_ids: list[np.ndarray] = []  # supervoxel ids with >= 1 pair
        self._sv_start: list[np.ndarray] = []
        self._sv_count: list[np.ndarray] = []
        for v in range(len(self._items)):
            image, sv = self.volume(v)
            excl = np.zeros(sv.shape[2], dtype=bool)
            if self.exclude_labels is not None:
                lab = labels[v]() if callable(labels[v]) else labels[v]
                lab = np.asarray(lab)
                if lab.shape != sv.shape:
                    raise ValueError(f"volume {v}: label shape {lab.shape} differs from supervoxels {sv.shape}")
                excl = excluded_slices(lab, self.exclude_labels, setting2_rule)
            areas = slice_areas(sv)                                        # once per volume for all three
            cands = valid_pairs(sv, self.min_area, excl, areas=areas)
            if self.gap > 1:
                self._present.append((areas >= self.min_area) & ~excl[None, :])
            self._endings.append(ending_pairs(sv, self.min_area, excl, areas=areas) if self.vanish
                                 else np.zeros((0, 3), np.int64))
            ids, start, count = np.unique(cands[:, 0], return_index=True, return_counts=True)
            self.excluded.append(excl)
            self._cands.append(cands)
            self._sv_ids.append(ids)
            self._sv_start.append(start)
            self._sv_count.append(count)
        self._usable = np.array([v for v in range(len(self._items)) if len(self._cands[v])], dtype=np.int64)
        self._ending_vols = np.array([v for v in range(len(self._items)) if len(self._endings[v])], dtype=np.int64)
        if not len(self._usable):
            raise ValueError(
                f"no supervoxel covers >= {self.min_area} px in two adjacent (non-excluded) slices of any volume"
            )

    def __len__(self) -> int:
        """Number of candidate (volume, supervoxel, z) pairs."""
        return int(sum(len(c) for c in self._cands))

    def candidates(self, v: int) -> np.ndarray:
        """(N, 2) (supervoxel id, z) pairs of volume `v` that can be drawn (read-only)."""
        view = self._cands[v].view()
        view.flags.writeable = False
        return view

    @property
    def usable(self) -> tuple[int, ...]:
        """Indices of the volumes with at least one candidate pair."""
        return tuple(int(v) for v in self._usable)

    def volume(self, v: int) -> tuple[np.ndarray, np.ndarray]:
        """Volume v's (image (H, W, Z), supervoxels (H, W, Z)), loaded if it is not kept."""
        def load():
            item = self._items[v]
            item = item() if callable(item) else item
            if not isinstance(item, (tuple, list)) or len(item) < 2:
                raise ValueError(f"volume {v}: expected (image, supervoxels), got {type(item).__name__}")
            image, sv = np.asarray(item[0]), np.asarray(item[1])
            if image.ndim != 3 or image.shape != sv.shape:
                raise ValueError(f"volume {v}: image {image.shape} and supervoxels {sv.shape} must be equal 3D shapes")
            return image, sv

        return self._loaded.get(v, load)

    def sample(self) -> dict:
        """One episode (see class doc)."""
        if self.vanish and len(self._ending_vols) and self.rng.random() < self.vanish:
            return self._ending_episode()
        v = int(self.rng.choice(self._usable))
        j = int(self.rng.integers(len(self._sv_ids[v])))
        k = int(self._sv_ids[v][j])
        z = int(self._cands[v][self._sv_start[v][j] + self.rng.integers(self._sv_count[v][j]), 1])
        zs, step = (z + 1, -1) if self.rng.random() < 0.5 else (z, 1)
        zq = zs + step
        if self.gap > 1:
            present = self._present[v][k]
            for _ in range(int(self.rng.integers(1, self.gap + 1)) - 1):
                if not 0 <= zq + step < len(present) or not present[zq + step]:
                    break
                zq += step
        image, sv = self.volume(v)
        region = [k]
        if self.merge:
            steps = 0 if self.rng.random() < 0.5 else int(self.rng.integers(1, self.merge + 1))
            region = grow_region(sv[:, :, zs], k, steps, self.rng)
        return make_episode(image, sv, v, k, region, zs, zq)

    def _ending_episode(self) -> dict:
        """A single supervoxel on its last slice (support) and the adjacent slice where it ends (query)."""
        v = int(self.rng.choice(self._ending_vols))
        k, zs, zq = (int(x) for x in self._endings[v][self.rng.integers(len(self._endings[v]))])
        image, sv = self.volume(v)
        return make_episode(image, sv, v, k, [k], zs, zq)

    __call__ = sample

    def __iter__(self):
        while True:
            yield self.sample()
