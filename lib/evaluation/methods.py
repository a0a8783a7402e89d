"""Segmentation methods the harness can score: SD-FSMIS in-process and two baselines.

Every method answers `run_group(dataset, job, group) -> bool (N, H, W)` for the group's query
slices. Array methods implement `segment(query (N, H, W) in [0, 1], support_image (1, H, W),
support_mask (1, H, W)) -> bool (N, H, W)`; the server method (server.py) talks to a MONAI Label app.
"""
from __future__ import annotations

import numpy as np

from lib.transforms.postprocess import intensity_gate, largest_component

METHODS = ("sdfsmis", "copy", "registration")


def chain_extent(group) -> tuple[int, int]:
    """(first, last) slice a chained walk covers: the group's query slices and its support slice."""
    return min(*group.query_z, group.support_z), max(*group.query_z, group.support_z)


class ArrayMethod:
    """Cuts the group's slices out of the (normalised) volumes and calls `segment`.

    gate: pass the masks through the intensity gate (lib.transforms.postprocess), as the app does.
    """

    name = "array"
    gate = False

    def _arrays(self, dataset, job, group):
        """-> query (N, H, W), support image (1, H, W), support mask bool (1, H, W) of the group."""
        q_img, _, _ = dataset.load(job.query)
        s_img, s_lbl, _ = dataset.load(group.support)
        query = np.moveaxis(q_img[..., list(group.query_z)], -1, 0)
        return query, s_img[..., group.support_z][None], (s_lbl[..., group.support_z] == job.label)[None]

    def run_group(self, dataset, job, group) -> np.ndarray:
        arrays = self._arrays(dataset, job, group)
        return self.gated(np.asarray(self.segment(*arrays), dtype=bool), dataset, job, group, arrays)

    def gated(self, masks: np.ndarray, dataset, job, group, arrays=None) -> np.ndarray:
        """(N, H, W) masks of a group -> through the intensity gate if `gate` is set (the group's
        `_arrays` are cut out only then, unless given)."""
        if not self.gate:
            return masks
        query, support_image, support_mask = arrays or self._arrays(dataset, job, group)
        return intensity_gate(query, masks, support_image, support_mask)

    def segment(self, query, support_image, support_mask) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"method": self.name, "intensity_gate": self.gate}


class CopyMethod(ArrayMethod):
    """Baseline: the support mask pasted unchanged onto every query slice."""

    name = "copy"

    def segment(self, query, support_image, support_mask) -> np.ndarray:
        if query.shape[1:] != support_mask.shape[1:]:
            raise ValueError(f"copy needs equal slice sizes: query {query.shape[1:]}, support {support_mask.shape[1:]}")
        return np.broadcast_to(support_mask[:1].astype(bool), query.shape).copy()


class RegistrationMethod(ArrayMethod):
    """Baseline: 2D registration of the support slice to each query slice (SimpleITK), then the
    support mask warped with nearest neighbour.

    Both slices are block-averaged by `shrink` (256 -> 64 px); affine with mean squares
    (regular-step gradient descent, `affine_iterations`), the metric restricted to the support
    organ dilated by `mask_margin` px; then `demons_iterations` of fast symmetric-forces demons
    (Gaussian sigma `demons_sigma`, in shrunk pixels). Deterministic; `threads` ITK threads.

    `chain` (propagation inside one volume): register each slice to its neighbour towards the
    annotated slice and warp that neighbour's result, walking outward one slice at a time.
    """

    name = "registration"

    def __init__(self, shrink: int = 4, affine_iterations: int = 30, mask_margin: int = 40,
                 demons_iterations: int = 20, demons_sigma: float = 1.5, threads: int = 1,
                 chain: bool = False):
        import SimpleITK as sitk

        self.sitk = sitk
        sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(int(threads))
        self.params = {"shrink": shrink, "affine_iterations": affine_iterations, "mask_margin": mask_margin,
                       "demons_iterations": demons_iterations, "demons_sigma": demons_sigma,
                       "threads": threads, "metric": "MeanSquares", "transform": "affine + demons",
                       "chain": chain}
        self.failures = 0

    def describe(self) -> dict:
        return {"method": self.name, **self.params, "intensity_gate": self.gate,
                "failures_fell_back_to_copy": self.failures}

    def _small(self, arr: np.ndarray):
        """(H, W) -> SimpleITK image block-averaged by k, placed in full-resolution pixel coordinates."""
        k = self.params["shrink"]
        h, w = arr.shape[0] // k, arr.shape[1] // k
        small = arr[: h * k, : w * k].reshape(h, k, w, k).mean(axis=(1, 3)).astype(np.float32)
        img = self.sitk.GetImageFromArray(small)
        img.SetSpacing((float(k), float(k)))
        img.SetOrigin(((k - 1) / 2.0, (k - 1) / 2.0))
        return img

    def register(self, fixed: np.ndarray, moving: np.ndarray, moving_mask: np.ndarray):
        """Transform mapping fixed (query) points to moving (support) points."""
        sitk, p = self.sitk, self.params
        f, m = self._small(fixed), self._small(moving)
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMeanSquares()
        if p["mask_margin"]:
            radius = max(1, int(round(p["mask_margin"] / p["shrink"])))
            organ = sitk.Cast(self._small(moving_mask.astype(np.float32)) > 0, sitk.sitkUInt8)
            reg.SetMetricMovingMask(sitk.BinaryDilate(organ, [radius, radius]))
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-3, p["affine_iterations"], relaxationFactor=0.6)
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetInitialTransform(sitk.AffineTransform(2), inPlace=False)   # slices share the pixel grid
        tx = reg.Execute(f, m)
        if p["demons_iterations"]:
            warped = sitk.Resample(m, f, tx, sitk.sitkLinear, 0.0)
            demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
            demons.SetNumberOfIterations(p["demons_iterations"])
            demons.SetStandardDeviations(p["demons_sigma"])
            field = demons.Execute(f, warped)
            tx = sitk.CompositeTransform([tx, sitk.DisplacementFieldTransform(field)])
        return tx

    def warp(self, fixed: np.ndarray, moving: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """(H, W) slices and the moving slice's bool mask -> that mask warped onto `fixed`
        (unchanged when registration fails, e.g. too few samples inside the mask)."""
        sitk = self.sitk
        try:
            tx = self.register(fixed, moving, mask)
        except RuntimeError:
            self.failures += 1
            return mask
        warped = sitk.Resample(sitk.GetImageFromArray(mask.astype(np.uint8)), sitk.GetImageFromArray(fixed), tx,
                               sitk.sitkNearestNeighbor, 0)
        return sitk.GetArrayFromImage(warped).astype(bool)

    def segment(self, query, support_image, support_mask) -> np.ndarray:
        moving = np.asarray(support_image[0], dtype=np.float32)
        mask = np.asarray(support_mask[0]).astype(bool)
        return np.stack([self.warp(fixed, moving, mask) for fixed in np.asarray(query, dtype=np.float32)])

    def run_group(self, dataset, job, group) -> np.ndarray:
        """Chained (`chain`) when support and queries are one volume; else every query from the support."""
        if not self.params["chain"] or group.support != job.query:
            return super().run_group(dataset, job, group)
        image, label, _ = dataset.load(job.query)
        z0 = group.support_z
        masks = {z0: label[..., z0] == job.label}
        lo, hi = chain_extent(group)
        for step in (1, -1):
            for z in range(z0 + step, (hi + 1) if step > 0 else (lo - 1), step):
                prev = masks[z - step]
                fixed, moving = (np.asarray(image[..., i], dtype=np.float32) for i in (z, z - step))
                masks[z] = self.warp(fixed, moving, prev) if prev.any() else prev
        return self.gated(np.stack([masks[z] for z in group.query_z]), dataset, job, group)


class SDFSMISMethod(ArrayMethod):
    """The SD-FSMIS model in-process: one segment() call per group (support branch once)."""

    name = "sdfsmis"

    def __init__(self, model, batch_size: int = 8, info: dict | None = None, chain: bool = False,
                 largest: bool = True, gate: bool = False):
        self.model = model
        self.batch_size = batch_size
        self.info = info or {}
        self.chain = chain
        self.largest = largest
        self.gate = gate

    def describe(self) -> dict:
        return {"method": self.name, "batch_size": self.batch_size, "chain": self.chain,
                "largest_component": self.largest, "intensity_gate": self.gate, **self.info}

    def run_group(self, dataset, job, group) -> np.ndarray:
        """Chained (--chain) when support and queries are one volume; else one support for all."""
        if not self.chain or group.support != job.query:
            masks = super().run_group(dataset, job, group)
        else:
            from lib.model.chain import chain_segment

            image, label, _ = dataset.load(job.query)
            lo, hi = chain_extent(group)
            stack = np.moveaxis(image[..., lo:hi + 1], -1, 0)                     # (hi - lo + 1, H, W)
            masks, _ = chain_segment(self.model, stack, group.support_z - lo, label[..., group.support_z] == job.label)
            masks = self.gated(masks[np.asarray(group.query_z) - lo], dataset, job, group)
        return largest_component(masks) if self.largest else masks

    def segment(self, query, support_image, support_mask) -> np.ndarray:
        import torch

        with torch.inference_mode():
            masks = self.model.segment(query, support_image, support_mask, batch_size=self.batch_size)
        return masks.cpu().numpy().astype(bool)
