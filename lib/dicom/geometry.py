"""NIfTI affine (RAS+ world) <-> DICOM slice geometry (LPS+ patient coordinates).

A NIfTI volume `vol` of shape (H, W, Z) maps voxel (i, j, k) to RAS world coordinates with its
4x4 `affine`. DICOM uses LPS: x and y change sign. Slice k becomes one DICOM image whose pixel
(row r, column c) is voxel (i=c, j=r, k): the image's pixel array is `vol[:, :, k].T` (W rows,
H columns), ImageOrientationPatient holds the directions of i (along a row) and j (down a
column), PixelSpacing is [spacing of j, spacing of i] and ImagePositionPatient is voxel (0, 0, k).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


class GeometryError(ValueError):
    """An affine that no DICOM image series can represent (singular, sheared, or oblique slices)."""


@dataclass(frozen=True)
class SliceGeometry:
    """Per-series DICOM geometry: IOP (6,), IPP per slice (Z, 3), PixelSpacing [row, col], slice step."""

    orientation: tuple[float, ...]
    positions: np.ndarray
    pixel_spacing: tuple[float, float]
    slice_spacing: float

    @property
    def normal(self) -> np.ndarray:
        """Unit normal of the image planes: cross(row direction, column direction), LPS."""
        o = np.asarray(self.orientation, dtype=float)
        return np.cross(o[:3], o[3:])


def slice_geometry(affine: np.ndarray, n_slices: int) -> SliceGeometry:
    """4x4 RAS affine of an (H, W, Z) volume -> the DICOM geometry of its Z slices (LPS)."""
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4):
        raise GeometryError(f"expected a 4x4 affine, got shape {affine.shape}")
    m = RAS_TO_LPS @ affine[:3, :3]
    origin = RAS_TO_LPS @ affine[:3, 3]
    spacing = np.linalg.norm(m, axis=0)
    if np.any(spacing <= 0) or abs(np.linalg.det(m)) < 1e-9:
        raise GeometryError(f"singular affine (voxel spacing {spacing.tolist()})")
    dirs = m / spacing
    if abs(dirs[:, 0] @ dirs[:, 1]) > 1e-4:
        raise GeometryError("the affine's i and j axes are not orthogonal (sheared in-plane grid)")
    normal = np.cross(dirs[:, 0], dirs[:, 1])
    if abs(abs(normal @ dirs[:, 2]) - 1.0) > 1e-4:
        raise GeometryError("the affine's slice axis is not perpendicular to its slices (gantry tilt/shear)")
    positions = origin[None, :] + np.arange(n_slices)[:, None] * m[:, 2][None, :]
    return SliceGeometry(
        orientation=tuple(float(x) for x in np.concatenate([dirs[:, 0], dirs[:, 1]])),
        positions=positions,
        pixel_spacing=(float(spacing[1]), float(spacing[0])),
        slice_spacing=float(spacing[2]),
    )


def series_affine(orientation, positions, pixel_spacing) -> np.ndarray:
    """DICOM geometry (IOP, IPP per slice in file order, PixelSpacing) -> 4x4 RAS affine of the
    (H, W, Z) volume whose slice k is the k-th position (inverse of `slice_geometry`)."""
    o = np.asarray(orientation, dtype=float).reshape(2, 3)
    pos = np.asarray(positions, dtype=float).reshape(-1, 3)
    row_sp, col_sp = (float(x) for x in pixel_spacing)
    m = np.zeros((3, 3))
    m[:, 0] = o[0] * col_sp
    m[:, 1] = o[1] * row_sp
    if len(pos) > 1:
        m[:, 2] = (pos[-1] - pos[0]) / (len(pos) - 1)
    else:
        m[:, 2] = np.cross(o[0], o[1])
    affine = np.eye(4)
    affine[:3, :3] = RAS_TO_LPS @ m
    affine[:3, 3] = RAS_TO_LPS @ pos[0]
    return affine
