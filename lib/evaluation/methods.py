"""Segmentation methods the harness can score: SD-FSMIS in-process and two baselines.

Every method answers `run_group(dataset, job, group) -> bool (N, H, W)` for the group's query
slices. Array methods implement `segment(query (N, H, W) in [0, 1], support_image (1, H, W),
support_mask (1, H, W)) -> bool (N, H, W)`; the server method (server.py) talks to a MONAI Label app.
"""
from __future__ import annotations

import numpy as np

from lib.transforms.postprocess import intensity_gate

METHODS = ("sdfsmis", "copy", "registration", "prototype")   # prototype: lib/evaluation/prototype.py
ENCODERS = ("lite2", "ct3d", "lite2+ct3d")   # the prototype floor's / the registration's appearance features


def propagated(model, options, dataset, job, group, aligner=None) -> np.ndarray:
    """The app's pipeline (lib.pipeline.propagate) on one group: an annotation holding the group's support
    slice, the request the app would get -> the group's query slices of the result, bool (N, H, W).
    aligner: the registration walker's (None: its defaults)."""
    from lib.pipeline import propagate

    q_img, _, _ = dataset.load(job.query)
    s_img, s_lbl, _ = dataset.load(group.support)
    annotation = np.zeros(s_lbl.shape, dtype=np.uint8)
    annotation[..., group.support_z] = s_lbl[..., group.support_z] == job.label
    same = group.support == job.query
    result = propagate(model, q_img, annotation, options, support_image=None if same else s_img,
                       normalized=True, slices=list(group.query_z), aligner=aligner)
    return np.moveaxis(result.label[..., list(group.query_z)] > 0, -1, 0)


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

    `chain` (propagation inside one volume): the app's registration walk (lib.pipeline.propagate with no
    model, walker registration: each slice's mask its neighbour's registered onto it, outward from the
    annotated slice; with the gate on, each step gated before it is carried on; with `intensity`, the
    default, the walk's result refined as the app refines it), stepping with this method's aligner.
    `appearance` > 0: across volumes, the support is first located on each query slice (`locate`), then
    registered, and each warped mask is fused with pretrained appearance and intensity (lib.pipeline.appearance,
    that weight; `features`: a fine-tuned backbone, None = ImageNet's; `intensity` off: without intensity;
    `encoder`: the appearance logit from Lite2, from the CT encoder over whole volumes (ct3d,
    lib.evaluation.prototype.VolumePrototypeMethod) or the mean of the two (lite2+ct3d); locating stays Lite2's).
    """

    name = "registration"

    def __init__(self, threads: int = 1, chain: bool = False, gate: bool = False, appearance: float = 0.0,
                 device: str = "cpu", features=None, locate: bool = True, intensity: bool = True, encoder: str = "lite2",
                 **params):
        from lib.pipeline.appearance import AppearancePrior
        from lib.transforms.align import SliceAligner

        super().__init__(gate)
        self.aligner = SliceAligner(threads=threads, **params)
        self.chain, self.intensity = chain, intensity
        self._prior = dict(weight=appearance, device=device, weights=features, locate=locate, intensity=intensity)
        self.prior = AppearancePrior(**self._prior) if appearance else None
        self.encoder = encoder
        self.volume = None
        if appearance and encoder != "lite2":   # the CT encoder's logit alone, or averaged with Lite2's
            from lib.evaluation.prototype import VolumePrototypeMethod

            self.volume = VolumePrototypeMethod(device=device)

    def describe(self) -> dict:
        return {"method": self.name, **self.aligner.params, "chain": self.chain, "intensity_gate": self.gate,
                "chain_walk": "lib.pipeline.register_step (the app's walker registration)" if self.chain else None,
                "intensity_log_odds": self.intensity if self.chain or self.prior else False,
                "failures_fell_back_to_copy": self.aligner.failures,
                **(self.prior.describe() if self.prior else {"appearance_weight": 0.0}),
                **({"appearance_encoder": self.encoder, "ct_encoder": self.volume.encoder_info()} if self.volume else {})}

    def segment(self, query, support_image, support_mask) -> np.ndarray:
        """query (N, H, W); support image and mask (1, H', W') for all, or (N, H', W') one per query."""
        query = np.asarray(query, dtype=np.float32)
        images = np.broadcast_to(np.asarray(support_image, dtype=np.float32), (len(query),) + support_image.shape[1:])
        masks = np.broadcast_to(np.asarray(support_mask).astype(bool), (len(query),) + support_mask.shape[1:])
        return np.stack([self.aligner.warp_mask(fixed, moving, mask)
                         for fixed, moving, mask in zip(query, images, masks)])

    def run_group(self, dataset, job, group) -> np.ndarray:
        """Chained (`chain`) when support and queries are one volume; else every query from the support
        (fused with appearance across volumes when `appearance` is set)."""
        if group.support != job.query and self.prior is not None:
            from lib.pipeline.appearance import AppearancePrior

            prior = AppearancePrior(**self._prior, memo=True)   # locating and fusing share the group's features
            query, image, mask = arrays = self._arrays(dataset, job, group)
            images, masks = prior.supports(query, image[0], mask[0])
            logit = None
            if self.volume is not None:
                logit = self.volume.logits(dataset, job, group)
                if self.encoder == "lite2+ct3d":
                    logit = (logit + prior.logits(query, image[0], mask[0])) / 2
            fused = prior.fuse(query, image[0], mask[0], self.segment(query, images, masks), masks, logit=logit)
            return self.gated(fused, dataset, job, group, arrays)
        if not self.chain or group.support != job.query:
            return super().run_group(dataset, job, group)
        from lib.pipeline import PropagateOptions

        options = PropagateOptions(threshold=0.5, gate=self.gate, largest=False, intensity=self.intensity,
                                   walker="registration")
        return propagated(None, options, dataset, job, group, aligner=self.aligner)


class SDFSMISMethod(ArrayMethod):
    """The SD-FSMIS model in-process, through the app's own pipeline (lib.pipeline.propagate): each
    group is the request the app would get, an annotation holding the group's support slice, and its
    query slices are read out of the result. `options` are the app's (chain, gate, largest, ...)."""

    name = "sdfsmis"

    def __init__(self, model, options, info: dict | None = None):
        super().__init__(options.gate)
        self.model = model
        self.options = options
        self.info = info or {}

    def describe(self) -> dict:
        return {"method": self.name, "batch_size": self.options.batch_size, "chain": self.options.chain,
                "largest_component": self.options.largest, "intensity_gate": self.options.gate,
                "threshold": self.options.threshold, "merge": self.options.merge,
                "align_support": self.model.config.align_support, "appearance_weight": self.options.appearance,
                "locate_support": self.options.locate, "intensity_log_odds": self.options.intensity,
                "walker": self.options.walker, **self.info}

    def run_group(self, dataset, job, group) -> np.ndarray:
        return propagated(self.model, self.options, dataset, job, group)
