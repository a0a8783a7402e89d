"""A dataset folder checked up front, with a small cache of normalised volumes."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from lib.data.lru import LRU
from lib.data.volumes import DatasetError, VolumePair, find_pairs, load_pair
from lib.evaluation.protocol import organ_slices
from lib.transforms import normalize_volume


class EvalDataset:
    """Sorted image_K/label_K pairs of `folder`; `slices[i][organ]` = organ slices of volume i.

    Raises DatasetError naming the file for a missing label, an image/label shape mismatch, a
    volume that is not 3D, or an organ id that no label volume contains.
    """

    def __init__(self, folder, organs: dict[str, int], cache_size: int = 6):
        self.folder = Path(folder)
        self.organs = dict(organs)
        self.pairs: list[VolumePair] = find_pairs(self.folder, require_labels=True)
        self.case_ids = [p.case_id for p in self.pairs]
        self.slices: list[dict[str, list[int]]] = []
        self.shapes: list[tuple[int, ...]] = []
        found: set[int] = set()
        for pair in self.pairs:
            image_shape = _header_shape(pair.image)
            label_shape = _header_shape(pair.label)
            if image_shape != label_shape:
                raise DatasetError(
                    f"{pair.label.name} has shape {label_shape} but {pair.image.name} has {image_shape} "
                    f"(in {self.folder})"
                )
            label = np.asarray(nib.load(str(pair.label)).dataobj)
            label = label.reshape(label.shape[:3])
            found.update(int(v) for v in np.unique(label))
            self.slices.append({name: organ_slices(label, lid) for name, lid in self.organs.items()})
            self.shapes.append(image_shape)
        missing = {name: lid for name, lid in self.organs.items() if lid not in found}
        if missing:
            raise DatasetError(
                f"organ label id(s) {missing} occur in no label volume of {self.folder}; "
                f"ids present: {sorted(v for v in found if v)}"
            )
        self._cache = LRU(cache_size)

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
        """(image float32 (H, W, Z) in [0, 1] via normalize_volume, label int16 (H, W, Z), spacing mm)."""
        def read():
            image, label, spacing = load_pair(self.pairs[index])
            return normalize_volume(image), label, spacing

        return self._cache.get(index, read)


def _header_shape(path: Path) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in nib.load(str(path)).shape)
    except Exception as exc:  # nibabel raises several types for unreadable files
        raise DatasetError(f"cannot read {path}: {exc}") from exc
    if len(shape) == 4 and shape[-1] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise DatasetError(f"{path}: expected a 3D volume, got shape {shape}")
    return shape
