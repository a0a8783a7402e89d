"""The pretrained features alone, training-free: `python -m lib.evaluate --method prototype`.

Every query slice is compared with the support slice's organ and background prototypes on the
EfficientNet-Lite2 ImageNet features (lib.pipeline.appearance, lib.model.prototypes): the floor that
tells how much those features carry across patients before any training (issue 18).
"""
from __future__ import annotations

import numpy as np

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
