"""Find the annotation saved for an image in a MONAI Label datastore, DICOMweb (a SEG in the PACS) included.

MONAI Label 0.8.5's DICOMweb datastore turns a SEG into a `final` label only inside `datalist()`
(all labeled images at once); `get_labels_by_image_id` alone does not look in the PACS, and its
`get_label_uri(id, "final")` expects the SEG's series UID. `saved_label` fetches the newest SEG that
references the image and returns the label on the image's grid.
"""
from __future__ import annotations

import logging

import numpy as np

from lib.dicom.seg import label_on_image_grid

logger = logging.getLogger(__name__)


def saved_label_path(datastore, image_id: str, tag: str = "final") -> str | None:
    """Local path of the label file saved for image_id under `tag`, or None when there is none.

    For a DICOMweb datastore and tag 'final', the newest DICOM SEG in the PACS that references the
    image series is downloaded and converted first (a one-slice SEG gives a one-slice label file:
    use `saved_label` for the label on the image grid).
    """
    from monailabel.datastore.dicom import DICOMWebDatastore
    from monailabel.datastore.local import LocalDatastore

    if isinstance(datastore, DICOMWebDatastore) and tag == "final":
        from lib.dicom.web import seg_series_for

        segs = seg_series_for(datastore._client, image_id)
        if segs:
            datastore.get_image_uri(image_id)  # the image must be in the local cache before its label
            path = datastore.get_label_uri(segs[-1][1], "final", image_id)
            if path:
                return path
            logger.warning(f"SEG {segs[-1][1]} of image {image_id} could not be converted")
    labels = datastore.get_labels_by_image_id(image_id)
    if tag not in labels:
        return None
    getter = LocalDatastore.get_label_uri if isinstance(datastore, LocalDatastore) else type(datastore).get_label_uri
    return getter(datastore, labels[tag], tag) or None


def saved_label(datastore, image_id: str, tag: str = "final") -> np.ndarray | None:
    """uint8 label (H, W, Z) on the grid of `datastore.get_image_uri(image_id)`, or None."""
    path = saved_label_path(datastore, image_id, tag)
    if not path:
        return None
    return label_on_image_grid(path, datastore.get_image_uri(image_id))


def saved_label_file(datastore, image_id: str, tag: str = "final") -> str | None:
    """Path of a label file on the image's own grid (same size as the image), or None.

    Local datastores: the saved file itself. DICOMweb: the newest SEG referencing the image, put on
    the image grid and written to a temporary NIfTI with the image's geometry (a one-slice SEG gives
    a volume that is zero except on the annotated slice).
    """
    import os
    import tempfile

    import SimpleITK as sitk
    from monailabel.datastore.dicom import DICOMWebDatastore

    path = saved_label_path(datastore, image_id, tag)
    if not path or not os.path.exists(path):
        return None
    if not isinstance(datastore, DICOMWebDatastore):
        return path
    image_path = datastore.get_image_uri(image_id)
    image = sitk.ReadImage(str(image_path))
    label = sitk.ReadImage(str(path))
    if label.GetSize() == image.GetSize() and label.GetOrigin() == image.GetOrigin():
        return path
    from lib.dicom.seg import resample_to

    out = sitk.Cast(resample_to(label, image), sitk.sitkUInt8)
    fd, tmp = tempfile.mkstemp(suffix=".nii.gz", prefix="seg_support_")
    os.close(fd)
    sitk.WriteImage(out, tmp, True)
    return tmp
