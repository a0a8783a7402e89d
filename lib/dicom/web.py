"""Small DICOMweb helpers (QIDO/WADO/STOW through dicomweb-client), e.g. against Orthanc's /dicom-web."""
from __future__ import annotations

from typing import Sequence

from pydicom.dataset import Dataset


class DicomWebError(RuntimeError):
    """The DICOMweb server refused or could not be reached."""


def make_client(url: str):
    """DICOMweb client for a base URL such as http://127.0.0.1:8042/dicom-web (no auth)."""
    from dicomweb_client import DICOMwebClient

    return DICOMwebClient(url=url.rstrip("/"))


def store(client, datasets: Sequence[Dataset], batch: int = 32) -> None:
    """STOW-RS the datasets in batches; raises DicomWebError naming the URL on failure."""
    for start in range(0, len(datasets), batch):
        part = list(datasets[start:start + batch])
        for ds in part:  # without a preamble pydicom writes no 'DICM' header and readers refuse the file
            if getattr(ds, "preamble", None) is None:
                ds.preamble = b"\x00" * 128
        try:
            resp = client.store_instances(part)
        except Exception as exc:
            raise DicomWebError(f"STOW to {client.base_url} failed: {exc}") from exc
        failed = getattr(resp, "FailedSOPSequence", None)
        if failed:
            raise DicomWebError(f"STOW to {client.base_url}: {len(failed)} instance(s) refused")


def series_metadata(client, series_uid: str, study_uid: str | None = None) -> list[Dataset]:
    """WADO-RS metadata (no pixel data) of every instance of a series, as pydicom Datasets."""
    if not study_uid:
        found = client.search_for_series(search_filters={"SeriesInstanceUID": series_uid})
        if not found:
            raise DicomWebError(f"series {series_uid} not found at {client.base_url}")
        study_uid = str(Dataset.from_json(found[0]).StudyInstanceUID)
    return [Dataset.from_json(m) for m in client.retrieve_series_metadata(study_uid, series_uid)]


def seg_series_for(client, image_series_uid: str) -> list[tuple[str, str]]:
    """(StudyInstanceUID, SeriesInstanceUID) of each SEG series referencing the image series,
    oldest first (by SeriesDate + SeriesTime)."""
    out = []
    for item in client.search_for_series(search_filters={"Modality": "SEG"}):
        s = Dataset.from_json(item)
        meta = client.retrieve_series_metadata(str(s.StudyInstanceUID), str(s.SeriesInstanceUID))
        m = Dataset.from_json(meta[0]) if meta else Dataset()
        refs = m.get("ReferencedSeriesSequence") or []
        if any(str(r.get("SeriesInstanceUID", "")) == image_series_uid for r in refs):
            key = f"{m.get('SeriesDate', '')}{m.get('SeriesTime', '')}"
            out.append((key, str(s.StudyInstanceUID), str(s.SeriesInstanceUID)))
    return [(st, se) for _, st, se in sorted(out)]
