"""The pretrained features alone, training-free: `python -m lib.evaluate --method prototype`.

Every query slice is compared with the support slice's organ and background prototypes on the
EfficientNet-Lite2 ImageNet features (lib.pipeline.appearance, lib.model.prototypes): the floor that
tells how much those features carry across patients before any training (issue 18).
`--encoder ct3d` (VolumePrototypeMethod): the same rule on a CT-trained 3D encoder's features of whole
volumes (lib.evaluation.ct_encoder).
"""
from __future__ import annotations

import numpy as np

from lib.data.lru import LRU
from lib.evaluation.methods import ArrayMethod


class PrototypeMethod(ArrayMethod):
    """size: slices resized to size x size for the backbone (features at size / 8); batch: query
    slices per forward pass; weights: a fine-tuned backbone (lib.training.appearance), None = ImageNet's."""

    name = "prototype"

    def __init__(self, size: int = 256, batch: int = 16, gate: bool = False, device: str = "cpu", weights=None):
        from lib.pipeline.appearance import AppearancePrior

        super().__init__(gate)
        self.prior = AppearancePrior(0.0, size=size, batch=batch, device=device, weights=weights)

    def describe(self) -> dict:
        info = self.prior.describe()
        info.pop("appearance_weight")
        return {"method": self.name, **info, "intensity_gate": self.gate}

    def segment(self, query, support_image, support_mask) -> np.ndarray:
        return self.prior.logits(query, support_image[0], support_mask[0]) > 0


class VolumePrototypeMethod(ArrayMethod):
    """The same floor on a CT-trained 3D encoder (lib.evaluation.ct_encoder, `--encoder ct3d`): each
    volume goes through the network once, whole, and every slice takes its features from that feature
    volume; the prototypes and the matching rule are the 2D floor's (lib.model.prototypes).

    window: the HU window the volumes' 0-255 values were cut from (Abd-CT's preprocessing: -125..275);
    to_ras: array axes to flip to reach RAS (Abd-CT's pixels: axis 0 runs to the patient's left, axis 1 to
    the front, axis 2 up, whatever the header says); layers: lib.evaluation.ct_encoder.LAYERS."""

    name = "prototype"

    def __init__(self, window=(-125.0, 275.0), to_ras=(0,), layers=None, gate: bool = False,
                 device: str = "cpu", cache_size: int = 20, encoder=None):
        from lib.evaluation.ct_encoder import LAYERS, CTEncoder

        super().__init__(gate)
        self.window, self.to_ras = tuple(window), tuple(to_ras)
        self.encoder = encoder or CTEncoder(layers or LAYERS, device=device)
        self._features = LRU(cache_size)

    def encoder_info(self) -> dict:
        """What the features come from and how volumes are prepared for it."""
        from lib.evaluation.ct_encoder import SPACING, WEIGHTS

        return {"encoder": f"I3ResNet-152 ({WEIGHTS}), {'+'.join(self.encoder.layers)}",
                "spacing_mm": list(SPACING), "hu_window": list(self.window), "flip_to_ras": list(self.to_ras)}

    def describe(self) -> dict:
        return {"method": self.name, **self.encoder_info(), "intensity_gate": self.gate}

    def volume_features(self, dataset, index: int) -> list:
        """Per-layer features (C, z, x, y) of volume `index`, in the array's own axis directions."""
        from lib.data.volumes import DatasetError, load_volume

        def compute():
            raw, spacing = load_volume(dataset.pairs[index].image)
            if raw.min() < 0 or raw.max() > 255:
                raise DatasetError(f"{dataset.pairs[index].image}: values {raw.min():g}..{raw.max():g}; the CT "
                                   "encoder reads CT stored as 0-255 of an HU window (as Abd-CT)")
            lo, hi = self.window
            hu = np.flip(raw / 255.0 * (hi - lo) + lo, self.to_ras)
            flip = [2 + a for a in self.to_ras]                                       # (C, z, x, y): x = 2, y = 3
            return [f.flip(flip) for f in self.encoder.features(hu, spacing)]

        return self._features.get(index, compute)

    def logits(self, dataset, job, group) -> np.ndarray:
        """float32 (N, H, W): the organ-vs-background logit (lib.model.prototypes) of the group's query
        slices, from the support slice's prototypes."""
        import torch
        import torch.nn.functional as F

        from lib.evaluation.ct_encoder import slices_of
        from lib.model.prototypes import foreground_logit, prototypes

        _, s_lbl, _ = dataset.load(group.support)
        s_feat, q_feat = self.volume_features(dataset, group.support), self.volume_features(dataset, job.query)
        mask = torch.from_numpy((s_lbl[..., group.support_z] == job.label).astype(np.float32))[None, None]
        support = slices_of(s_feat, np.array([group.support_z]), s_lbl.shape[2], tuple(s_feat[0].shape[2:]))
        shape = dataset.shapes[job.query]
        query = slices_of(q_feat, np.array(group.query_z), shape[2], tuple(q_feat[0].shape[2:]))
        logit = foreground_logit(query, prototypes(support, mask))                     # (N, 1, h, w)
        return F.interpolate(logit, size=shape[:2], mode="bilinear")[:, 0].numpy()

    def run_group(self, dataset, job, group) -> np.ndarray:
        return self.gated(self.logits(dataset, job, group) > 0, dataset, job, group)
