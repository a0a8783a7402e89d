"""NIfTI volume -> DICOM CT/MR image series (one pydicom Dataset per slice), and back.

Geometry comes from the NIfTI affine (see `lib.dicom.geometry`); intensities are stored as 16-bit
integers: integer-valued volumes as they are, others scaled to uint16 with RescaleSlope/Intercept
so that a DICOM reader (SimpleITK, OHIF) gets the original values back to within slope / 2.
"""
from __future__ import annotations

import datetime as _dt
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.valuerep import format_number_as_ds
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

from lib.dicom.geometry import slice_geometry

SOP_CLASS = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "MR": "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
}


class SeriesError(ValueError):
    """Bad input for a DICOM series (not a 3D volume, unknown modality, unreadable file)."""


def _ds(x) -> str:
    """Float -> DICOM decimal string (at most 16 characters, as precise as that allows)."""
    x = float(x)
    return "0" if abs(x) < 1e-12 else format_number_as_ds(x)


def _encode(vol: np.ndarray) -> tuple[np.ndarray, float, float, int]:
    """float/int volume -> (stored uint16/int16 array, slope, intercept, PixelRepresentation)."""
    vol = np.asarray(vol)
    if not np.all(np.isfinite(vol)):
        raise SeriesError("the volume has NaN or infinite values")
    lo, hi = float(vol.min()), float(vol.max())
    integral = np.issubdtype(vol.dtype, np.integer) or np.array_equal(vol, np.round(vol))
    if integral and lo >= 0 and hi <= 65535:
        return vol.astype(np.uint16), 1.0, 0.0, 0
    if integral and lo >= -32768 and hi <= 32767:
        return vol.astype(np.int16), 1.0, 0.0, 1
    slope = (hi - lo) / 65535.0 if hi > lo else 1.0
    stored = np.round((vol.astype(np.float64) - lo) / slope)
    return np.clip(stored, 0, 65535).astype(np.uint16), slope, lo, 0


def volume_to_datasets(
    vol: np.ndarray,
    affine: np.ndarray,
    *,
    modality: str = "CT",
    series_description: str = "SD-FSMIS volume",
    patient_id: str = "ANON0001",
    patient_name: str = "Anonymous^Patient",
    study_description: str = "SD-FSMIS",
    study_uid: str | None = None,
    series_uid: str | None = None,
    series_number: int = 1,
) -> list[Dataset]:
    """(H, W, Z) volume + 4x4 RAS affine -> Z single-frame DICOM datasets (slice k = vol[:, :, k].T).

    UIDs not given are generated; instance UIDs derive from the series UID, so a given
    series_uid makes the output deterministic.
    """
    modality = modality.upper()
    if modality not in SOP_CLASS:
        raise SeriesError(f"modality must be one of {sorted(SOP_CLASS)}, got {modality!r}")
    vol = np.asarray(vol)
    if vol.ndim == 4 and vol.shape[-1] == 1:
        vol = vol[..., 0]
    if vol.ndim != 3:
        raise SeriesError(f"expected a 3D (H, W, Z) volume, got shape {vol.shape}")
    geom = slice_geometry(affine, vol.shape[2])
    stored, slope, intercept, pixel_rep = _encode(vol)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid(entropy_srcs=[series_uid, "frame-of-reference"])
    now = _dt.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    values = vol.astype(np.float64)
    p1, p99 = np.percentile(values, [1, 99]) if values.size else (0.0, 1.0)
    center, width = (p1 + p99) / 2.0, max(p99 - p1, 1e-3)
    normal = geom.normal

    out = []
    for k in range(vol.shape[2]):
        sop_uid = generate_uid(entropy_srcs=[series_uid, str(k)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SOP_CLASS[modality]
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.preamble = b"\x00" * 128  # written as a Part 10 file (preamble + 'DICM') wherever it goes
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.SOPClassUID, ds.SOPInstanceUID = SOP_CLASS[modality], sop_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = time
        ds.AccessionNumber = ""
        ds.Modality = modality
        ds.Manufacturer = "SD-FSMIS"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = study_description
        ds.SeriesDescription = series_description
        ds.PatientName, ds.PatientID = patient_name, patient_id
        ds.PatientBirthDate, ds.PatientSex = "", ""
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", series_number, k + 1
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [_ds(x) for x in geom.positions[k]]
        ds.ImageOrientationPatient = [_ds(x) for x in geom.orientation]
        ds.SliceLocation = _ds(geom.positions[k] @ normal)
        ds.SliceThickness = _ds(geom.slice_spacing)
        ds.SpacingBetweenSlices = _ds(geom.slice_spacing)
        ds.PixelSpacing = [_ds(x) for x in geom.pixel_spacing]
        if modality == "CT":
            ds.KVP = ""
        else:
            ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "RM", "NONE", "", "3D"
            ds.EchoTrainLength = ""
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = int(vol.shape[1]), int(vol.shape[0])
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = pixel_rep
        ds.RescaleIntercept = f"{intercept:.8g}"
        ds.RescaleSlope = f"{slope:.8g}"
        ds.RescaleType = "US"
        ds.WindowCenter = f"{center:.6g}"
        ds.WindowWidth = f"{width:.6g}"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        out.append(ds)
    return out


def nifti_to_datasets(path, **kwargs) -> list[Dataset]:
    """NIfTI file (3D) -> DICOM datasets; keyword arguments as in `volume_to_datasets`."""
    path = Path(path)
    if not path.exists():
        raise SeriesError(f"NIfTI file not found: {path}")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises several types for a bad file
        raise SeriesError(f"{path}: not a readable NIfTI file ({exc})") from exc
    return volume_to_datasets(np.asarray(img.dataobj), img.affine, **kwargs)


def write_datasets(datasets: list[Dataset], folder) -> list[Path]:
    """Save each dataset as FOLDER/<SOPInstanceUID>.dcm (DICOM Part 10 files); returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        p = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(str(p), write_like_original=False)
        paths.append(p)
    return paths


def read_series(folder):
    """DICOM series folder -> SimpleITK image (slices sorted along the plane normal, as MONAI
    Label's DICOMweb datastore does when it converts a series to NIfTI)."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    names = reader.GetGDCMSeriesFileNames(str(folder))
    if not names:
        raise SeriesError(f"no DICOM series in {folder}")
    reader.SetFileNames(names)
    return reader.Execute()
