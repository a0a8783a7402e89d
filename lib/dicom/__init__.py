"""DICOM for the PACS workflow: NIfTI -> DICOM series (STOW to Orthanc), label <-> DICOM SEG,
and the annotation saved for an image in a MONAI Label (DICOMweb) datastore.

    python -m lib.dicom.upload image.nii.gz --url http://127.0.0.1:8042/dicom-web
    python -m lib.dicom.upload_seg label.nii.gz --image-series UID --url ... --keep-slice largest
"""
from lib.dicom.geometry import GeometryError, series_affine, slice_geometry
from lib.dicom.seg import (
    SegError,
    label_on_image_grid,
    label_to_seg,
    read_seg,
    reference_image,
    seg_to_label,
)
from lib.dicom.series import SeriesError, nifti_to_datasets, read_series, volume_to_datasets, write_datasets

__all__ = [
    "GeometryError", "SegError", "SeriesError",
    "slice_geometry", "series_affine",
    "volume_to_datasets", "nifti_to_datasets", "write_datasets", "read_series",
    "reference_image", "label_to_seg", "read_seg", "seg_to_label", "label_on_image_grid",
]
