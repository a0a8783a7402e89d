"""Upload a NIfTI volume to a DICOMweb server (STOW-RS) as a DICOM CT or MR series.

    python -m lib.dicom.upload image.nii.gz --series-description "Abd CT 0" \
        --url http://127.0.0.1:8042/dicom-web [--modality CT|MR] [--patient-id P1] [--out-dir DIR]

Prints the StudyInstanceUID and SeriesInstanceUID (the series UID is MONAI Label's image id).
With --out-dir the DICOM files are also written there; --url may then be left out (files only).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lib.dicom.series import SeriesError, nifti_to_datasets, write_datasets
from lib.dicom.web import DicomWebError, make_client, store


def guess_modality(path: Path) -> str:
    """'MR' when the file or folder name says MRI/MR, else 'CT'."""
    text = str(path).lower()
    return "MR" if ("mri" in text or "/mr" in text or "_mr" in text) else "CT"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lib.dicom.upload", description=__doc__.split("\n\n")[0])
    p.add_argument("image", type=Path, help="3D NIfTI volume (.nii or .nii.gz)")
    p.add_argument("--url", help="DICOMweb base URL, e.g. http://127.0.0.1:8042/dicom-web")
    p.add_argument("--series-description", default=None, help="SeriesDescription (default: the file name)")
    p.add_argument("--modality", choices=["CT", "MR"], default=None, help="default: MR if the path says mri, else CT")
    p.add_argument("--patient-id", default="ANON0001")
    p.add_argument("--patient-name", default="Anonymous^Patient")
    p.add_argument("--study-uid", default=None, help="add the series to this study (default: a new study)")
    p.add_argument("--out-dir", type=Path, default=None, help="also write the DICOM files here")
    args = p.parse_args(argv)
    if not args.url and not args.out_dir:
        p.error("give --url (upload) and/or --out-dir (write files)")
    name = args.image.name.replace(".nii.gz", "").replace(".nii", "")
    try:
        datasets = nifti_to_datasets(
            args.image,
            modality=args.modality or guess_modality(args.image),
            series_description=args.series_description or name,
            patient_id=args.patient_id,
            patient_name=args.patient_name,
            study_uid=args.study_uid,
        )
        if args.out_dir:
            write_datasets(datasets, args.out_dir)
        if args.url:
            store(make_client(args.url), datasets)
    except (SeriesError, DicomWebError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"StudyInstanceUID={datasets[0].StudyInstanceUID}")
    print(f"SeriesInstanceUID={datasets[0].SeriesInstanceUID}")
    print(f"{len(datasets)} slices, modality {datasets[0].Modality}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
