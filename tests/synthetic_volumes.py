"""Synthetic abdominal-like volumes for the data and training tests (no real data needed)."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np


def phantom(shape=(96, 96, 16), seed: int = 0):
    """-> (image float32 (H, W, Z), body bool (H, W, Z), organs uint8 (H, W, Z) with ids 1, 2).

    An elliptic body (intensity ~100) with a dark hole-free interior, two brighter organ blobs
    (1: large, slices 3-12; 2: small, slices 6-9) and a bright speck outside the body.
    """
    rng = np.random.default_rng(seed)
    h, w, z = shape
    yy, xx = np.mgrid[:h, :w]
    ell = ((yy - h / 2) / (0.42 * h)) ** 2 + ((xx - w / 2) / (0.46 * w)) ** 2 <= 1
    body = np.repeat(ell[:, :, None], z, axis=2)
    image = np.where(body, 100.0 + rng.normal(0, 3, shape), 0.0)
    organs = np.zeros(shape, np.uint8)
    big = ((yy - 0.4 * h) / (0.18 * h)) ** 2 + ((xx - 0.4 * w) / (0.2 * w)) ** 2 <= 1
    small = ((yy - 0.62 * h) / (0.08 * h)) ** 2 + ((xx - 0.68 * w) / (0.07 * w)) ** 2 <= 1
    organs[:, :, 3:13][big] = 1
    organs[:, :, 6:10][small] = 2
    image[organs == 1] += 80
    image[organs == 2] += 140
    image[2:4, 2:4, :] = 250  # a speck outside the body: not part of the body mask
    return image.astype(np.float32), body, organs


def write_dataset(folder: Path, n: int = 2, shape=(96, 96, 16), spacing=(1.5, 1.5, 4.0)) -> Path:
    """Write image_K / label_K NIfTI pairs (K = 0..n-1) into `folder`; returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    affine = np.diag([*spacing, 1.0])
    for k in range(n):
        image, _, organs = phantom(shape, seed=k)
        nib.save(nib.Nifti1Image(image, affine), str(folder / f"image_{k}.nii.gz"))
        nib.save(nib.Nifti1Image(organs, affine), str(folder / f"label_{k}.nii.gz"))
    return folder
