"""Training volumes for self-supervised episodes: images + cached pseudo-labels, no ground truth.

`collect_images` turns dataset folders and image files into a list of image paths;
`load_training_volumes` reads them, scales intensities to [0, 1] and attaches the supervoxels.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tqdm import tqdm

from lib.data.supervoxel_cache import default_cache_dir, load_or_compute
from lib.data.volumes import DatasetError, find_pairs, load_volume
from lib.transforms import normalize_volume


def collect_images(sources: Iterable) -> list[Path]:
    """Folders (their image_K.nii(.gz) files) and image files -> sorted unique image paths."""
    images: list[Path] = []
    for src in sources:
        src = Path(src)
        if src.is_dir():
            images += [p.image for p in find_pairs(src, require_labels=False)]
        elif src.is_file():
            images.append(src)
        else:
            raise DatasetError(f"training data {src} is neither a folder nor a file")
    if not images:
        raise DatasetError("no training images given")
    return sorted(set(images), key=str)


def label_path(image: Path) -> Path | None:
    """image_K.nii.gz -> label_K.nii.gz beside it (for Setting 2 exclusion only), if present."""
    name = image.name.replace("image_", "label_", 1)
    path = image.with_name(name)
    return path if name != image.name and path.is_file() else None


def load_training_volumes(images: Sequence[Path], cache_dir=None, with_labels: bool = False,
                          progress: bool = True) -> tuple[list[tuple[np.ndarray, np.ndarray]], list]:
    """-> ([(image (H, W, Z) float32 in [0, 1], supervoxels (H, W, Z) uint16)], [label or None]).

    Pseudo-labels come from the content-keyed cache (computed on first use).
    """
    cache_dir = cache_dir or default_cache_dir()
    volumes, labels = [], []
    for path in tqdm(images, desc="training volumes", unit="vol", disable=not progress):
        raw, spacing = load_volume(path)
        pseudo = load_or_compute(raw, spacing, cache_dir=cache_dir)
        volumes.append((normalize_volume(raw), pseudo.supervoxels))
        if with_labels:
            lab = label_path(Path(path))
            if lab is None:
                raise DatasetError(f"Setting 2 needs the label of {path} (label_K beside image_K)")
            labels.append(load_volume(lab, dtype=np.int16)[0])
    return volumes, labels
