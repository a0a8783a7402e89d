"""Scoring a running MONAI Label app (apps/sdfsmis) instead of the in-process model.

Contract of the app's `sdfsmis` infer task used here:
- cross-volume (protocol mode): the support volume's label is saved (PUT /datastore/label) and the
  query is inferred with params {"support_image": <support id>, "support_tag": <tag>}. The tag is
  `eval_<support id>`, not `final`: the app prefers a label saved for the query image itself under
  the support tag, and no query ever has one under its support's private tag;
- same volume (propagation mode): the annotation is uploaded with the infer request (`label`);
- the result is a uint8 label volume of the query's shape; any non-zero voxel is the organ.
Each group is one request whose support label holds just that group's support slice (value 1),
so the server sees exactly the support slice the protocol prescribes.
"""
from __future__ import annotations

import re
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from lib.evaluation.methods import ArrayMethod


class ServerMethod(ArrayMethod):
    """Runs each group through `infer` of a MONAI Label server (monailabel.client)."""

    name = "server"

    def __init__(self, url: str, dataset_name: str, model: str = "sdfsmis", client=None, tmpdir=None):
        super().__init__(gate=False)        # the app applies its own gate
        self._tmp = tempfile.TemporaryDirectory(prefix="eval-server-") if tmpdir is None else None
        self.tmpdir = Path(tmpdir or self._tmp.name)
        if client is None:
            from monailabel.client import MONAILabelClient

            client = MONAILabelClient(url, tmpdir=str(self.tmpdir))
        self.client = client
        self.url = url
        self.model = model
        self.prefix = re.sub(r"[^A-Za-z0-9_-]+", "-", dataset_name).strip("-") or "eval"
        self._uploaded: set[int] = set()
        self.requests = 0

    def describe(self) -> dict:
        return {"method": "sdfsmis", "server": self.url, "infer_task": self.model, "requests": self.requests}

    def image_id(self, dataset, index: int) -> str:
        return f"{self.prefix}_image_{dataset.case_ids[index]}"

    def _ensure_uploaded(self, dataset, index: int) -> str:
        image_id = self.image_id(dataset, index)
        if index not in self._uploaded:
            self.client.upload_image(str(dataset.pairs[index].image), image_id=image_id)
            self._uploaded.add(index)
        return image_id

    def _support_label_file(self, dataset, job, group) -> str:
        """NIfTI (support's grid) with the organ on the group's support slice only, value 1."""
        _, label, _ = dataset.load(group.support)
        out = np.zeros(label.shape, dtype=np.uint8)
        out[..., group.support_z] = label[..., group.support_z] == job.label
        affine = nib.load(str(dataset.pairs[group.support].image)).affine
        path = self.tmpdir / f"support_{dataset.case_ids[group.support]}_{job.organ}_{group.support_z}.nii.gz"
        nib.save(nib.Nifti1Image(out, affine), str(path))
        return str(path)

    def run_group(self, dataset, job, group) -> np.ndarray:
        query_id = self._ensure_uploaded(dataset, job.query)
        label_file = self._support_label_file(dataset, job, group)
        if group.support == job.query:
            result, _ = self.client.infer(self.model, query_id, {}, label_in=label_file)
        else:
            support_id = self._ensure_uploaded(dataset, group.support)
            tag = f"eval_{support_id}"
            self.client.save_label(support_id, label_file, tag=tag)
            result, _ = self.client.infer(self.model, query_id, {"support_image": support_id, "support_tag": tag})
        self.requests += 1
        if result is None:
            raise RuntimeError(f"server {self.url}: infer '{self.model}' on {query_id} returned no label file")
        volume = np.asarray(nib.load(result).dataobj)
        volume = volume.reshape(volume.shape[:3]) if volume.ndim == 4 else volume
        expected = dataset.shapes[job.query]
        if tuple(volume.shape) != tuple(expected):
            raise RuntimeError(f"server result for {query_id} has shape {volume.shape}, expected {expected}")
        return np.moveaxis(volume[..., list(group.query_z)] > 0, -1, 0)
