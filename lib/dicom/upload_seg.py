"""Store a label volume as a DICOM SEG of an image series already in the PACS (STOW-RS).

    python -m lib.dicom.upload_seg label.nii.gz --image-series SERIES_UID \
        --url http://127.0.0.1:8042/dicom-web [--keep-slice largest|K] [--labels 6] [--map 6=1] [--names 1=liver]

The label file must be in the same patient space as the series (e.g. the label_K.nii.gz beside
the image_K.nii.gz that was uploaded with `python -m lib.dicom.upload`); it is resampled onto the
series by position. --keep-slice keeps one axial slice (index K of the label file's last axis, or
the slice with the largest annotated area): the one-slice annotation SD-FSMIS needs, as a
radiologist would save it from OHIF or 3D Slicer. Prints the SEG's SeriesInstanceUID.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from lib.dicom.seg import SegError, label_to_seg
from lib.dicom.web import DicomWebError, make_client, series_metadata, store


def keep_one_slice(label: np.ndarray, which: str) -> tuple[np.ndarray, int]:
    """(H, W, Z) label -> (label with only slice k kept, k); which is 'largest' or an index."""
    if which == "largest":
        k = int(np.argmax((label != 0).sum(axis=(0, 1))))
    else:
        k = int(which)
        if not 0 <= k < label.shape[2]:
            raise SegError(f"--keep-slice {k} is outside 0..{label.shape[2] - 1}")
    out = np.zeros_like(label)
    out[:, :, k] = label[:, :, k]
    return out, k


def parse_names(text: str | None) -> dict[int, str]:
    """'1=liver,2=spleen' -> {1: 'liver', 2: 'spleen'}."""
    names = {}
    for part in filter(None, (text or "").split(",")):
        key, _, value = part.partition("=")
        names[int(key)] = value.strip()
    return names


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lib.dicom.upload_seg", description=__doc__.split("\n\n")[0])
    p.add_argument("label", type=Path, help="label volume (.nii.gz/.nrrd), integer values, 0 = background")
    p.add_argument("--image-series", required=True, help="SeriesInstanceUID of the image series the label belongs to")
    p.add_argument("--url", required=True, help="DICOMweb base URL, e.g. http://127.0.0.1:8042/dicom-web")
    p.add_argument("--keep-slice", default=None, help="'largest' or a slice index: keep only that slice")
    p.add_argument("--labels", default=None, help="keep only these label values, e.g. 6 or 1,6 (default: all)")
    p.add_argument("--map", default=None, help="change label values, e.g. 6=1 (abd-ct liver -> the app's liver=1)")
    p.add_argument("--names", default=None, help="segment names, e.g. 1=liver,2=spleen")
    p.add_argument("--series-description", default="SD-FSMIS annotation")
    p.add_argument("--out", type=Path, default=None, help="also write the SEG file here")
    args = p.parse_args(argv)
    try:
        if not args.label.exists():
            raise SegError(f"label file not found: {args.label}")
        img = sitk.ReadImage(str(args.label))
        arr = sitk.GetArrayFromImage(img).transpose(2, 1, 0)
        if args.labels:
            keep = [int(v) for v in args.labels.split(",")]
            arr = np.where(np.isin(arr, keep), arr, 0)
        if args.map:
            mapped = arr.copy()
            for src, dst in parse_names(args.map).items():
                mapped[arr == src] = int(dst)
            arr = mapped
        if args.keep_slice is not None:
            arr, k = keep_one_slice(arr, args.keep_slice)
            print(f"kept slice {k} of {args.label.name}", file=sys.stderr)
        label = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)).astype(np.uint16))
        label.CopyInformation(img)
        client = make_client(args.url)
        source = series_metadata(client, args.image_series)
        seg = label_to_seg(label, source, parse_names(args.names), args.series_description)
        if args.out:
            seg.save_as(str(args.out), write_like_original=False)
        store(client, [seg])
    except (SegError, DicomWebError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"SeriesInstanceUID={seg.SeriesInstanceUID}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
