"""The local datastore the app runs on, refusing anything that would resolve outside the studies folder.

MONAI Label's LocalDatastore joins ids and tags into paths as given (`/abs/x` or `../../x` leave the
studies folder). `SafeLocalDatastore` checks every id and tag (lib.server.validate.plain_name), every
resulting path (inside the studies folder after resolving links), and every image / label file
before it is stored (lib.server.files: type, size, integrity; a label on its image's grid).
Unknown ids answer 404 instead of MONAI Label's exceptions.

LocalDatastore guards its JSON file with a file lock only, while its in-memory index is changed by
request threads (uploads) and by the file watcher's thread (reconcile on every file event); a
reconcile iterating the index while an upload adds to it raised "dictionary changed size during
iteration" and killed the watcher, after which files written by other processes (batch infer
results) were never picked up. Every method that reads or changes the index as a whole runs under
one re-entrant lock here, and a failed reconcile is logged instead of ending the watcher.
"""
from __future__ import annotations

import functools
import logging
import os
import threading

from monailabel.datastore.local import LocalDatastore

from lib.server.files import DEFAULT_MAX_VOXELS, check_file, check_same_grid
from lib.server.validate import ClientError, plain_name, upload_name

logger = logging.getLogger(__name__)


# LocalDatastore methods that iterate or change the in-memory index (see the module docstring)
SERIALISED = ("_reconcile_datastore", "_init_from_datastore_file", "_update_datastore_file", "add_image",
              "remove_image", "save_label", "remove_label", "update_image_info", "update_label_info",
              "datalist", "list_images", "get_labeled_images", "get_unlabeled_images", "status", "json")


def _serialised(method):
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        with self._index_lock:
            return method(self, *args, **kwargs)
    return call


class SafeLocalDatastore(LocalDatastore):
    max_voxels = DEFAULT_MAX_VOXELS

    def __init__(self, *args, **kwargs):
        self._index_lock = threading.RLock()   # before LocalDatastore's __init__ reads its file
        super().__init__(*args, **kwargs)

    def _on_any_event(self, event):
        """The file watcher's callback: a failure is logged, the watcher lives on."""
        try:
            super()._on_any_event(event)
        except Exception:
            logger.exception("datastore reconcile after a file event failed; the next event retries")

    def _on_modify_event(self, event):
        try:
            super()._on_modify_event(event)
        except Exception:
            logger.exception("datastore reload after a file event failed; the next event retries")

    # ---- containment ------------------------------------------------------------------------------
    @property
    def root(self) -> str:
        return os.path.realpath(self._datastore_path)

    def inside(self, path: str) -> str:
        """path (may be '') -> itself, when it resolves inside the studies folder; else 400."""
        if path and os.path.commonpath([self.root, os.path.realpath(path)]) != self.root:
            raise ClientError("the request resolves outside the studies folder and was refused", 400)
        return path

    def _known(self, image_id: str) -> None:
        plain_name(image_id, "image id")
        if image_id not in self._datastore.objects:
            raise ClientError(f"image {image_id!r} is not in the datastore", 404)

    # ---- reads -----------------------------------------------------------------------------------
    def get_image_uri(self, image_id: str) -> str:
        if not isinstance(image_id, str) or image_id not in self._datastore.objects:
            return ""
        return self.inside(super().get_image_uri(image_id))

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        if not isinstance(label_id, str) or not isinstance(label_tag, str):
            return ""
        plain_name(label_tag, "label tag")
        return self.inside(super().get_label_uri(label_id, label_tag))

    def get_image_info(self, image_id: str):
        self._known(image_id)
        info = super().get_image_info(image_id)
        info.pop("path", None)    # never show server paths
        return info

    def get_label_info(self, label_id: str, label_tag: str):
        self._known(label_id)
        plain_name(label_tag, "label tag")
        if not self._datastore.label(label_id, label_tag):
            raise ClientError(f"no label {label_id!r} under tag {label_tag!r}", 404)
        return super().get_label_info(label_id, label_tag)

    # ---- writes ----------------------------------------------------------------------------------
    def add_image(self, image_id, image_filename, image_info):
        stem, ext = upload_name(os.path.basename(image_filename), "image file")
        image_id = plain_name(image_id or stem, "image id")
        check_file(image_filename, self.max_voxels, "image")
        self.inside(os.path.join(self._datastore.image_path(), image_id + ext))
        return super().add_image(image_id, image_filename, image_info if isinstance(image_info, dict) else {})

    def save_label(self, image_id, label_filename, label_tag, label_info):
        self._known(image_id)
        plain_name(label_tag, "label tag")
        _, ext = upload_name(os.path.basename(label_filename), "label file")
        header = check_file(label_filename, self.max_voxels, "label")
        image = self.get_image_uri(image_id)
        if image and not os.path.isdir(image):
            check_same_grid(header, check_file(image, self.max_voxels, "image"), "label")
        self.inside(os.path.join(self._datastore.label_path(label_tag), image_id + ext))
        return super().save_label(image_id, label_filename, label_tag, label_info if isinstance(label_info, dict) else {})

    def remove_image(self, image_id: str) -> None:
        self._known(image_id)
        self.inside(super().get_image_uri(image_id))
        return super().remove_image(image_id)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        plain_name(label_id, "label id")
        plain_name(label_tag, "label tag")
        if not self._datastore.label(label_id, label_tag):
            raise ClientError(f"no label {label_id!r} under tag {label_tag!r}", 404)
        self.inside(super().get_label_uri(label_id, label_tag))
        return super().remove_label(label_id, label_tag)

    def update_image_info(self, image_id: str, info) -> None:
        self._known(image_id)
        if not isinstance(info, dict):
            raise ClientError("image info must be a JSON object")
        return super().update_image_info(image_id, info)

    def update_label_info(self, label_id: str, label_tag: str, info) -> None:
        self.get_label_info(label_id, label_tag)
        if not isinstance(info, dict):
            raise ClientError("label info must be a JSON object")
        return super().update_label_info(label_id, label_tag, info)


for _name in SERIALISED:
    setattr(SafeLocalDatastore, _name, _serialised(getattr(SafeLocalDatastore, _name)))


def safe_datastore(studies: str, max_voxels: int = DEFAULT_MAX_VOXELS):
    """The app's datastore for a local studies folder (None for a DICOMweb / remote one)."""
    if studies.startswith(("http://", "https://")):
        return None
    from monailabel.config import settings

    ds = SafeLocalDatastore(studies, extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
                            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
                            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY)
    ds.max_voxels = int(max_voxels)
    return ds
