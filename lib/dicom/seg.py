"""Label volumes <-> DICOM SEG (pydicom-seg, the library MONAI Label's DICOMweb datastore reads SEGs with).

Grids: a DICOM series defines a reference grid (`reference_image`): slices sorted along the plane
normal, exactly as SimpleITK/GDCM (and so MONAI Label's datastore and OHIF) stack them. A label
given as a numpy array (H, W, Z) is on that grid; a label given as a SimpleITK image (e.g. read from
a NIfTI file) is resampled onto it by physical position (nearest neighbour). A SEG read back covers
only the slices it has frames for (one slice for a one-slice annotation); `seg_to_label` and
`label_on_image_grid` put it back on the full image grid, zeros elsewhere.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


class SegError(ValueError):
    """Bad input for a DICOM SEG: empty label, mismatched grid, not a SEG dataset."""


def _f(values) -> np.ndarray:
    return np.asarray([float(v) for v in values], dtype=float)


def reference_image(datasets: Sequence[Dataset]) -> sitk.Image:
    """Image series datasets (any order; pixel data not needed) -> empty uint8 SimpleITK image on
    the series grid: size (Columns, Rows, slices), slices sorted along the plane normal."""
    if not datasets:
        raise SegError("no source image datasets given")
    iop = _f(datasets[0].ImageOrientationPatient)
    normal = np.cross(iop[:3], iop[3:])
    positions = sorted((_f(ds.ImagePositionPatient) for ds in datasets), key=lambda p: float(p @ normal))
    row_sp, col_sp = _f(datasets[0].PixelSpacing)
    if len(positions) > 1:
        dz = float((positions[-1] - positions[0]) @ normal) / (len(positions) - 1)
    else:
        dz = float(getattr(datasets[0], "SpacingBetweenSlices", None) or getattr(datasets[0], "SliceThickness", 1) or 1)
    img = sitk.Image(int(datasets[0].Columns), int(datasets[0].Rows), len(positions), sitk.sitkUInt8)
    img.SetOrigin(tuple(positions[0]))
    img.SetSpacing((col_sp, row_sp, dz))
    img.SetDirection(tuple(np.stack([iop[:3], iop[3:], normal], axis=1).ravel()))
    return img


def array_to_image(arr: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """(H, W, Z) array in the reference's index order (x, y, z) -> SimpleITK image on that grid."""
    arr = np.asarray(arr)
    if arr.shape != reference.GetSize():
        raise SegError(f"label shape {arr.shape} does not match the image grid {reference.GetSize()}")
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)))
    img.CopyInformation(reference)
    return img


def image_to_array(img: sitk.Image) -> np.ndarray:
    """SimpleITK image -> (H, W, Z) array (index order x, y, z, like nibabel's)."""
    return sitk.GetArrayFromImage(img).transpose(2, 1, 0)


def resample_to(label: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """Nearest-neighbour resampling of a label image onto the reference grid (zeros outside)."""
    return sitk.Resample(label, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, label.GetPixelID())


def _template(labels: Sequence[int], names: Mapping[int, str], description: str) -> Dataset:
    import pydicom_seg

    from monailabel.datastore.utils.colors import GENERIC_ANATOMY_COLORS

    attrs = []
    for idx in labels:
        name = names.get(idx, f"label {idx}")
        rgb = [int(c) for c in list(GENERIC_ANATOMY_COLORS.get(name, (255, 0, 0)))[:3]]
        attrs.append({
            "labelID": int(idx),
            "SegmentLabel": name,
            "SegmentDescription": name,
            "SegmentAlgorithmType": "MANUAL",
            "SegmentedPropertyCategoryCodeSequence": {
                "CodeValue": "123037004", "CodingSchemeDesignator": "SCT", "CodeMeaning": "Anatomical Structure"},
            "SegmentedPropertyTypeCodeSequence": {
                "CodeValue": "85756007", "CodingSchemeDesignator": "SCT", "CodeMeaning": name},
            "recommendedDisplayRGBValue": rgb,
        })
    return pydicom_seg.template.from_dcmqi_metainfo({
        "ContentCreatorName": "Reader1",
        "ClinicalTrialSeriesID": "Session1",
        "ClinicalTrialTimePointID": "1",
        "SeriesDescription": description,
        "SeriesNumber": "300",
        "InstanceNumber": "1",
        "segmentAttributes": [attrs],
        "ContentLabel": "SEGMENTATION",
        "ContentDescription": description,
        "BodyPartExamined": "",
    })


def label_to_seg(
    label,
    source: Sequence[Dataset],
    names: Mapping[int, str] | None = None,
    series_description: str = "SD-FSMIS annotation",
    skip_empty_slices: bool = True,
) -> Dataset:
    """Label -> DICOM SEG dataset referencing the `source` image series (one segment per label value).

    label: (H, W, Z) integer array on the series grid (`reference_image(source)`), or a SimpleITK
    image anywhere in patient space (resampled onto the grid). With skip_empty_slices (default) the
    SEG holds frames only for annotated slices, like a one-slice annotation saved from a viewer.
    """
    import pydicom_seg

    ref = reference_image(source)
    img = resample_to(label, ref) if isinstance(label, sitk.Image) else array_to_image(label, ref)
    img = sitk.Cast(img, sitk.sitkUInt16)
    values = sorted(int(v) for v in np.unique(sitk.GetArrayViewFromImage(img)) if v != 0)
    if not values:
        raise SegError("the label is empty on the image grid (no non-zero voxels): nothing to save as a SEG")
    writer = pydicom_seg.MultiClassWriter(
        template=_template(values, dict(names or {}), series_description),
        inplane_cropping=False,
        skip_empty_slices=skip_empty_slices,
        skip_missing_segment=False,
    )
    return writer.write(img, list(source))


def read_seg(seg) -> sitk.Image:
    """DICOM SEG (Dataset or file path) -> label image covering the SEG's frames (segment number as value)."""
    import pydicom_seg

    ds = seg if isinstance(seg, Dataset) else pydicom.dcmread(str(seg))
    if getattr(ds, "SOPClassUID", None) != SEG_SOP_CLASS or getattr(ds, "Modality", None) != "SEG":
        raise SegError("not a DICOM SEG dataset (Modality must be SEG)")
    return pydicom_seg.MultiClassReader().read(ds).image


def seg_to_label(seg, reference: sitk.Image) -> np.ndarray:
    """DICOM SEG -> uint8 label (H, W, Z) on the reference image's grid."""
    img = resample_to(read_seg(seg), reference)
    return image_to_array(img).astype(np.uint8)


def label_on_image_grid(label_path, image_path) -> np.ndarray:
    """Label file (NIfTI/NRRD, e.g. the one-slice `.seg.nrrd` MONAI Label's DICOMweb datastore makes
    from a SEG) -> uint8 (H, W, Z) array on the grid of the image file (what nibabel loads)."""
    label = sitk.ReadImage(str(label_path))
    image = sitk.ReadImage(str(image_path))
    if label.GetNumberOfComponentsPerPixel() != 1:
        raise SegError(f"{label_path}: a label must have one value per voxel")
    out = resample_to(label, image)
    return image_to_array(out).astype(np.uint8)
