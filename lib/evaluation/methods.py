"""Segmentation methods the harness can score: SD-FSMIS in-process and two baselines.

Every method answers `run_group(dataset, job, group) -> bool (N, H, W)` for the group's query
slices. Array methods implement `segment(query (N, H, W) in [0, 1], support_image (1, H, W),
support_mask (1, H, W)) -> bool (N, H, W)`; the server method (server.py) talks to a MONAI Label app.
"""
from __future__ import annotations

import numpy as np

from lib.transforms.postprocess import chain_gate, intensity_gate, largest_component

METHODS = ("sdfsmis", "copy", "registration")


def chain_extent(group) -> tuple[int, int]:
    """(first, last) slice a chained walk covers: the group's query slices and its support slice."""
    return min(*group.query_z, group.support_z), max(*group.query_z, group.support_z)


class ArrayMethod:
    """Cuts the group's slices out of the (normalised) volumes and calls `segment`.

    gate: pass the masks through the intensity gate (lib.transforms.postprocess), as the app does.
    """

    name = "array"

    def __init__(self, gate: bool = False):
        self.gate = gate

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

    def verifier(self, stack: np.ndarray, start: int, seed: np.ndarray):
        """The per-step check of a chained walk over `stack` (N, H, W) from the annotated slice `start`
        (mask `seed`): the intensity gate against the annotation when `gate` is set, else None."""
        return chain_gate(stack, start, seed) if self.gate else None

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
    """Baseline: 2D registration of the support slice to each query slice, then the support mask
    warped with nearest neighbour (lib.transforms.align.SliceAligner: affine + demons on a 64 px
    grid, the metric restricted to the support organ dilated by 40 px at 256; deterministic).

    `chain` (propagation inside one volume): register each slice to its neighbour towards the
    annotated slice and warp that neighbour's result, walking outward one slice at a time
    (lib.model.chain.walk); with the gate on, each step's result is gated before it is carried on.
    """

    name = "registration"

    def __init__(self, threads: int = 1, chain: bool = False, gate: bool = False, **params):
        from lib.transforms.align import SliceAligner

        super().__init__(gate)
        self.aligner = SliceAligner(threads=threads, **params)
        self.chain = chain

    def describe(self) -> dict:
        return {"method": self.name, **self.aligner.params, "chain": self.chain, "intensity_gate": self.gate,
                "failures_fell_back_to_copy": self.aligner.failures}

    def segment(self, query, support_image, support_mask) -> np.ndarray:
        moving = np.asarray(support_image[0], dtype=np.float32)
        mask = np.asarray(support_mask[0]).astype(bool)
        return np.stack([self.aligner.warp_mask(fixed, moving, mask) for fixed in np.asarray(query, dtype=np.float32)])

    def run_group(self, dataset, job, group) -> np.ndarray:
        """Chained (`chain`) when support and queries are one volume; else every query from the support."""
        if not self.chain or group.support != job.query:
            return super().run_group(dataset, job, group)
        from lib.model.chain import walk

        image, label, _ = dataset.load(job.query)
        lo, hi = chain_extent(group)
        stack = np.moveaxis(image[..., lo:hi + 1], -1, 0)
        start, seed = group.support_z - lo, label[..., group.support_z] == job.label
        verify = self.verifier(stack, start, seed)

        def step(a, b, mask):
            warped = self.aligner.warp_mask(stack[b], stack[a], mask)
            return warped if verify is None else verify(b, warped)

        masks = walk(len(stack), start, seed, step)
        empty = np.zeros_like(seed)
        return np.stack([masks.get(z - lo, empty) for z in group.query_z])


class SDFSMISMethod(ArrayMethod):
    """The SD-FSMIS model in-process: one segment() call per group (support branch once), or, for a
    model with `align_support`, the support registered onto every query first (lib.transforms.align).
    Chained (`chain`), the gate checks every step before its result is carried on."""

    name = "sdfsmis"

    def __init__(self, model, batch_size: int = 8, info: dict | None = None, chain: bool = False,
                 largest: bool = True, gate: bool = False, threads: int = 1):
        from lib.transforms.align import support_aligner

        super().__init__(gate)
        self.model = model
        self.batch_size = batch_size
        self.info = info or {}
        self.chain = chain
        self.largest = largest
        self.aligner = support_aligner(model.config.align_support, threads=threads)

    def describe(self) -> dict:
        return {"method": self.name, "batch_size": self.batch_size, "chain": self.chain,
                "largest_component": self.largest, "intensity_gate": self.gate,
                "align_support": self.model.config.align_support, **self.info}

    def run_group(self, dataset, job, group) -> np.ndarray:
        """Chained (--chain): inside one volume from the annotated slice; across volumes from the
        group's middle query slice, segmented from the support (`seeded_chain`). Else one support for all."""
        if not self.chain:
            masks = super().run_group(dataset, job, group)
        else:
            from lib.model.chain import chain_segment, seeded_chain

            align = self.aligner and self.aligner.align
            image, label, _ = dataset.load(job.query)
            if group.support == job.query:
                lo, hi = chain_extent(group)
                stack = np.moveaxis(image[..., lo:hi + 1], -1, 0)                 # (hi - lo + 1, H, W)
                start, seed = group.support_z - lo, label[..., group.support_z] == job.label
                masks, _ = chain_segment(self.model, stack, start, seed, verify=self.verifier(stack, start, seed),
                                         align=align)
            else:
                lo, hi = min(group.query_z), max(group.query_z)
                stack = np.moveaxis(image[..., lo:hi + 1], -1, 0)
                s_img, s_lbl, _ = dataset.load(group.support)
                masks, _ = seeded_chain(self.model, stack, group.query_z[len(group.query_z) // 2] - lo,
                                        s_img[..., group.support_z], s_lbl[..., group.support_z] == job.label,
                                        align=align, verify_for=chain_gate if self.gate else None)
            masks = masks[np.asarray(group.query_z) - lo]
        return largest_component(masks) if self.largest else masks

    def segment(self, query, support_image, support_mask) -> np.ndarray:
        import torch

        with torch.inference_mode():
            masks = self.model.segment(query, support_image, support_mask, batch_size=self.batch_size,
                                       align=self.aligner and self.aligner.align)
        return masks.cpu().numpy().astype(bool)
