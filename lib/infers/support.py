"""Where the support annotation of an infer request comes from (the app calls this with the image id).

Order: 1. the `label` uploaded with the request; 2. a label saved in the datastore for the same image
under the support tag (conf `label_tag`, request `support_tag`, default `final`); 3. `support_image`:
another image id whose saved label (same tag) supports this one (cross-volume).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from lib.configs.request import REQUEST_KEY  # noqa: F401 - where the resolved support travels in the request
from lib.dicom.datastore import saved_label_file
from lib.infers.errors import bad_request, not_found
from lib.server.validate import is_upload_path



@dataclass
class Support:
    """kind: uploaded | saved | support_image. image: the support volume's path (None = the query volume)."""

    kind: str
    label: str
    image: str | None = None
    image_id: str | None = None
    tag: str | None = None

    def to_request(self) -> dict:
        return asdict(self)


def _known(datastore, image_id: str) -> bool:
    return bool(image_id) and bool(datastore.get_image_uri(image_id))


def _some_ids(datastore, n: int = 10) -> str:
    ids = sorted(datastore.list_images())
    more = f", ... ({len(ids)} in all)" if len(ids) > n else ""
    return ", ".join(ids[:n]) + more if ids else "(the datastore is empty)"


def _saved_label(datastore, image_id: str, tag: str) -> str | None:
    """Path of the label saved for `image_id` under `tag` (a DICOM SEG in the PACS for DICOMweb), or None."""
    return saved_label_file(datastore, image_id, tag)


def check_image(request: dict, datastore) -> None:
    """404 for an image id that is neither a file nor in the datastore (before MONAI Label resolves it)."""
    image = request.get("image")
    if isinstance(image, str) and not is_upload_path(image) and not _known(datastore, image):
        raise not_found(f"image {image!r} is not in the datastore; known images: {_some_ids(datastore)}")


def resolve_support(request: dict, datastore, default_tag: str = "final") -> Support:
    """The support of `request` (uses the image id, so call it before MONAI Label swaps the id for a path)."""
    tag = str(request.get("support_tag") or default_tag)
    image_id = request.get("image")
    label = request.get("label")
    if label:
        if not isinstance(label, str) or not is_upload_path(label) or not os.path.exists(label):
            raise bad_request(f"the uploaded label {label!r} could not be read")
        return Support("uploaded", label)
    if isinstance(image_id, str) and _known(datastore, image_id):
        saved = _saved_label(datastore, image_id, tag)
        if saved:
            return Support("saved", saved, image_id=image_id, tag=tag)
    other = request.get("support_image")
    if other:
        other = str(other)
        if not _known(datastore, other):
            raise not_found(f"support_image {other!r} is not in the datastore; known images: {_some_ids(datastore)}")
        saved = _saved_label(datastore, other, tag)
        if not saved:
            raise bad_request(f"support_image {other!r} has no label saved under tag {tag!r}: annotate it and "
                              f"save the label (Submit Label / PUT /datastore/label?tag={tag}) first")
        return Support("support_image", saved, image=datastore.get_image_uri(other), image_id=other, tag=tag)
    raise bad_request(
        f"no annotation for image {image_id!r}: upload a `label` with the request (3D Slicer: the Scribbles "
        f"panel of the sdfsmis_scribbles model), save a label for this image under tag {tag!r} "
        f"(Slicer: Submit Label; API: PUT /datastore/label), or name a `support_image` whose saved label "
        f"supports this one"
    )
