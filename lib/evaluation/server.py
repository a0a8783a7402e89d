"""Scoring a running MONAI Label app (apps/sdfsmis) instead of the in-process model.

Batch mode (default): before a fold is scored, `prepare` groups the fold's segment calls by support
and runs one `POST /batch/infer/sdfsmis` per group (lib.evaluation.server_api), then downloads each
result with `GET /datastore/label`:
- cross-volume (protocol mode): one batch per (support volume, support slice, organ) over the query
  volumes that use it; the support's label holding just that slice (value 1) is saved under a
  private support tag, and params {"support_image", "support_tag"} point every query at it;
- same volume (propagation mode): one batch per organ over the volumes; each volume's own
  annotation slice is saved under the private support tag, which the app reads as "a label saved
  for this image under the support tag".
Results are saved by the app under a private result tag; every private label is removed afterwards.
The private tags are per run, so no query ever has a label under its support tag, whatever else the
datastore holds. Per-request mode (`batch=False`) sends one `POST /infer/sdfsmis` per group instead.
The app segments the whole volume from its one support slice; only the group's slices are scored.
"""
from __future__ import annotations

import re
import tempfile
import uuid
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np

from lib.evaluation.methods import ArrayMethod


def batch_keys(jobs) -> dict:
    """{key: [(job, group), ...]}: segment calls one batch request can serve (same support label).

    key = ("own", label) when the group's support is its query volume, else (support, support_z, label).
    """
    out: dict = defaultdict(list)
    for job in jobs:
        for group in job.groups:
            key = ("own", job.label) if group.support == job.query else (group.support, group.support_z, job.label)
            out[key].append((job, group))
    return dict(out)


class ServerMethod(ArrayMethod):
    """Runs the groups through a MONAI Label server: batch infer (default) or one infer per group."""

    name = "server"

    def __init__(self, url: str, dataset_name: str, model: str = "sdfsmis", client=None, tmpdir=None,
                 batch: bool = True, wait_s: float = 30.0, params: dict | None = None):
        super().__init__(gate=False)        # the app applies its own gate
        self._tmp = tempfile.TemporaryDirectory(prefix="eval-server-") if tmpdir is None else None
        self.tmpdir = Path(tmpdir or self._tmp.name)
        if client is None:
            from lib.evaluation.server_api import AppClient

            client = AppClient(url, tmpdir=str(self.tmpdir))
        self.client = client
        self.url = url
        self.model = model
        self.batch = batch
        self.wait_s = wait_s
        self.params = dict(params or {})    # extra infer options (e.g. {"gate": False}), sent in both modes
        self.prefix = re.sub(r"[^A-Za-z0-9_-]+", "-", dataset_name).strip("-") or "eval"
        token = uuid.uuid4().hex[:8]
        self.support_tag, self.result_tag = f"eval-{token}-support", f"eval-{token}-result"
        self._uploaded: set[int] = set()
        self._ready: dict = {}              # (query, label, group) -> bool (N, H, W)
        self.requests = 0
        self.batches = 0

    def describe(self) -> dict:
        return {"method": "sdfsmis", "server": self.url, "infer_task": self.model,
                "mode": "batch" if self.batch else "per-request", "batch_requests": self.batches,
                "infer_requests": self.requests, "params": self.params}

    def image_id(self, dataset, index: int) -> str:
        return f"{self.prefix}_image_{dataset.case_ids[index]}"

    def _ensure_uploaded(self, dataset, index: int) -> str:
        image_id = self.image_id(dataset, index)
        if index not in self._uploaded:
            self.client.upload_image(str(dataset.pairs[index].image), image_id=image_id)
            self._uploaded.add(index)
        return image_id

    def _slice_label_file(self, dataset, volume: int, z: int, label_id: int) -> str:
        """NIfTI on `volume`'s grid with organ `label_id` on slice z only, value 1."""
        _, label, _ = dataset.load(volume)
        out = np.zeros(label.shape, dtype=np.uint8)
        out[..., z] = label[..., z] == label_id
        affine = nib.load(str(dataset.pairs[volume].image)).affine
        path = self.tmpdir / f"support_{dataset.case_ids[volume]}_{label_id}_{z}.nii.gz"
        nib.save(nib.Nifti1Image(out, affine), str(path))
        return str(path)

    def _read_result(self, path, dataset, query: int) -> np.ndarray:
        """A result label file -> bool (H, W, Z) of the query's shape (any non-zero voxel is the organ)."""
        volume = np.asarray(nib.load(path).dataobj)
        volume = volume.reshape(volume.shape[:3]) if volume.ndim == 4 else volume
        expected = dataset.shapes[query]
        if tuple(volume.shape) != tuple(expected):
            raise RuntimeError(f"server result for {self.image_id(dataset, query)} has shape {volume.shape}, "
                               f"expected {expected}")
        Path(path).unlink(missing_ok=True)
        return volume > 0

    # ---- batch mode ---------------------------------------------------------------------------
    def prepare(self, dataset, jobs) -> None:
        """Run the batch requests for all segment calls of `jobs` (one fold); run_group then reads them."""
        if not self.batch:
            return
        for key, pairs in batch_keys(jobs).items():
            self._run_batch(dataset, key, pairs)

    def _run_batch(self, dataset, key, pairs) -> None:
        label_id = key[-1]
        queries = sorted({job.query for job, _ in pairs})
        ids = {q: self._ensure_uploaded(dataset, q) for q in queries}
        params = {**self.params, "images": [ids[q] for q in queries], "support_tag": self.support_tag,
                  "label_tag": self.result_tag, "multi_gpu": False, "max_workers": 1, "logging": "WARNING"}
        if key[0] == "own":
            supports = {ids[job.query]: self._slice_label_file(dataset, job.query, group.support_z, label_id)
                        for job, group in pairs}
        else:
            support, support_z, _ = key
            support_id = self._ensure_uploaded(dataset, support)
            supports = {support_id: self._slice_label_file(dataset, support, support_z, label_id)}
            params["support_image"] = support_id
        try:
            for image_id, path in supports.items():
                self.client.save_label(image_id, path, tag=self.support_tag)
            self.client.run_batch(self.model, params)
            self.batches += 1
            results = {}
            for q in queries:
                path = self.client.fetch_label(ids[q], self.result_tag, wait_s=self.wait_s)
                results[q] = None if path is None else self._read_result(path, dataset, q)
        finally:
            for image_id in supports:
                self.client.remove_label(image_id, self.support_tag)
            for q in queries:
                self.client.remove_label(ids[q], self.result_tag)
        for job, group in pairs:
            if results[job.query] is not None:   # else run_group asks the server directly (its error message)
                self._ready[(job.query, job.label, group)] = np.moveaxis(
                    results[job.query][..., list(group.query_z)], -1, 0)

    # ---- one request per group ----------------------------------------------------------------
    def run_group(self, dataset, job, group) -> np.ndarray:
        ready = self._ready.pop((job.query, job.label, group), None)
        if ready is not None:
            return ready
        query_id = self._ensure_uploaded(dataset, job.query)
        label_file = self._slice_label_file(dataset, group.support, group.support_z, job.label)
        if group.support == job.query:
            result, _ = self.client.infer(self.model, query_id, dict(self.params), label_in=label_file)
        else:
            support_id = self._ensure_uploaded(dataset, group.support)
            self.client.save_label(support_id, label_file, tag=self.support_tag)
            try:
                result, _ = self.client.infer(self.model, query_id, {**self.params, "support_image": support_id,
                                                                     "support_tag": self.support_tag})
            finally:
                self.client.remove_label(support_id, self.support_tag)
        self.requests += 1
        if result is None:
            raise RuntimeError(f"server {self.url}: infer '{self.model}' on {query_id} returned no label file")
        volume = self._read_result(result, dataset, job.query)
        return np.moveaxis(volume[..., list(group.query_z)], -1, 0)

