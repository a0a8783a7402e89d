"""Reading a dataset folder of `image_K.nii.gz` / `label_K.nii.gz` pairs (the few-shot benchmarks' layout)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

_IMAGE_RE = re.compile(r"^image_(\d+)\.nii(\.gz)?$")


class DatasetError(ValueError):
    """A dataset folder that does not follow the image_K / label_K layout, or inconsistent volumes."""


@dataclass(frozen=True)
class VolumePair:
    """One case of a dataset folder: numeric id, image path, label path (None when absent)."""

    case_id: int
    image: Path
    label: Path | None


def find_pairs(folder, require_labels: bool = True) -> list[VolumePair]:
    """Cases of `folder` sorted by numeric id (the order the protocol's folds index into)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"dataset folder not found: {folder}")
    pairs = []
    for path in folder.iterdir():
        m = _IMAGE_RE.match(path.name)
        if not m:
            continue
        case_id = int(m.group(1))
        label = next((p for p in (folder / f"label_{m.group(1)}.nii.gz", folder / f"label_{m.group(1)}.nii") if p.exists()), None)
        if label is None and require_labels:
            raise DatasetError(f"{path.name} has no label_{m.group(1)}.nii.gz beside it in {folder}")
        pairs.append(VolumePair(case_id, path, label))
    if not pairs:
        raise DatasetError(f"no image_K.nii.gz files in {folder}")
    return sorted(pairs, key=lambda p: p.case_id)


def load_volume(path, dtype=np.float32) -> tuple[np.ndarray, tuple[float, float, float]]:
    """NIfTI file -> (array (H, W, Z) of `dtype`, voxel spacing in mm from the header)."""
    img = nib.load(str(path))
    arr = np.asarray(img.dataobj)
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise DatasetError(f"{path}: expected a 3D volume, got shape {arr.shape}")
    spacing = tuple(float(s) for s in img.header.get_zooms()[:3])
    return arr.astype(dtype, copy=False), spacing


def load_pair(pair: VolumePair) -> tuple[np.ndarray, np.ndarray | None, tuple[float, float, float]]:
    """(image float32 (H, W, Z), label int16 (H, W, Z) or None, spacing); checks the shapes agree."""
    image, spacing = load_volume(pair.image)
    label = None
    if pair.label is not None:
        label, _ = load_volume(pair.label, dtype=np.int16)
        if label.shape != image.shape:
            raise DatasetError(
                f"case {pair.case_id}: label shape {label.shape} differs from image shape {image.shape}"
            )
    return image, label, spacing
