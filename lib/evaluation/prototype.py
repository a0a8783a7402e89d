"""The pretrained features alone, training-free: `python -m lib.evaluate --method prototype`.

Every query slice is compared with the support slice's organ and background prototypes on the
EfficientNet-Lite2 ImageNet features (lib.model.backbone, lib.model.prototypes): the floor that
tells how much those features carry across patients before any training (issue 18).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from lib.evaluation.methods import ArrayMethod


class PrototypeMethod(ArrayMethod):
    """size: slices resized to size x size for the backbone (features at size / 8); batch: query
    slices per forward pass."""

    name = "prototype"

    def __init__(self, size: int = 256, batch: int = 16, gate: bool = False, device: str = "cpu"):
        from lib.model.backbone import PretrainedFeatures

        super().__init__(gate)
        self.size, self.batch, self.device = size, batch, device
        self.features = PretrainedFeatures().to(device).eval()

    def describe(self) -> dict:
        return {"method": self.name, "backbone": "tf_efficientnet_lite2 (ImageNet, stride 8 + 16)",
                "input_size": self.size, "intensity_gate": self.gate}

    def _embed(self, slices: np.ndarray) -> torch.Tensor:
        """(N, H, W) in [0, 1] -> features (N, C, size/8, size/8)."""
        x = torch.from_numpy(np.ascontiguousarray(slices, dtype=np.float32))[:, None].to(self.device)
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True)
        return torch.cat([self.features(x[i:i + self.batch]) for i in range(0, len(x), self.batch)])

    @torch.inference_mode()
    def segment(self, query, support_image, support_mask) -> np.ndarray:
        from lib.model.prototypes import foreground_logit, prototypes

        mask = torch.from_numpy(np.asarray(support_mask, dtype=np.float32))[:, None]
        mask = F.interpolate(mask, size=(self.size, self.size), mode="area").to(self.device)
        protos = prototypes(self._embed(np.asarray(support_image)), mask)
        logit = foreground_logit(self._embed(np.asarray(query)), protos)           # (N, 1, h, w)
        logit = F.interpolate(logit, size=tuple(query.shape[1:]), mode="bilinear")
        return (logit[:, 0] > 0).cpu().numpy()
