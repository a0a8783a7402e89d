"""Reading images / label maps and writing results for the infer task (SimpleITK: NIfTI, NRRD, DICOM series).

Arrays follow the project's layout: (H, W, Z) = SimpleITK index (i, j, k), the same axis order nibabel gives.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from lib.configs.app_config import RESULT_EXTENSIONS
from lib.pipeline import AnnotationError


def read_image(path) -> sitk.Image:
    """A file (NIfTI, NRRD, ...) or a folder of one DICOM series -> sitk.Image (a trailing size-1 4th axis dropped)."""
    path = str(path)
    try:
        if os.path.isdir(path):
            reader = sitk.ImageSeriesReader()
            names = reader.GetGDCMSeriesFileNames(path)
            if not names:
                raise AnnotationError(f"{Path(path).name}: folder holds no DICOM series")
            reader.SetFileNames(names)
            img = reader.Execute()
        else:
            img = sitk.ReadImage(path)
    except RuntimeError as err:
        raise AnnotationError(f"cannot read {Path(path).name}: {str(err).strip().splitlines()[-1]}") from None
    if img.GetDimension() == 4 and img.GetSize()[3] == 1:
        img = img[:, :, :, 0]
    return img


def to_array(img: sitk.Image) -> np.ndarray:
    """sitk.Image -> numpy array indexed (i, j, k) (= (H, W, Z)); vector images keep their components last."""
    arr = sitk.GetArrayFromImage(img)
    nd = img.GetDimension()
    if img.GetNumberOfComponentsPerPixel() > 1:
        return np.transpose(arr, tuple(range(nd - 1, -1, -1)) + (nd,))
    return np.transpose(arr, tuple(range(nd - 1, -1, -1)))


def read_volume(path, name: str = "image") -> tuple[np.ndarray, sitk.Image]:
    """path -> (array (H, W, Z) of a scalar 3D volume, the sitk image as reference for writing results)."""
    img = read_image(path)
    if img.GetNumberOfComponentsPerPixel() > 1 or img.GetDimension() != 3:
        kind = "a colour/vector" if img.GetNumberOfComponentsPerPixel() > 1 else f"a {img.GetDimension()}D"
        raise AnnotationError(
            f"{name} is {kind} image of size {tuple(img.GetSize())}: SD-FSMIS needs a scalar 3D volume "
            "(2D images are not supported)"
        )
    return to_array(img), img


def write_label(label: np.ndarray, reference: sitk.Image, extension: str = ".nii.gz") -> str:
    """uint8 (H, W, Z) + the image it belongs to -> a temporary result file with the image's geometry."""
    if extension not in RESULT_EXTENSIONS:
        raise AnnotationError(f"result_extension {extension!r} is not supported: choose one of {', '.join(RESULT_EXTENSIONS)}")
    out = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(label.astype(np.uint8), (2, 1, 0))))
    if reference.GetDimension() == 3 and tuple(reference.GetSize()) == tuple(label.shape):
        out.CopyInformation(reference)
    fd, path = tempfile.mkstemp(suffix=extension, prefix="sdfsmis_")
    os.close(fd)
    sitk.WriteImage(out, path, useCompression=extension != ".nii")
    return path
