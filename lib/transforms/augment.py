"""Episode preparation and RPT-style augmentation with MONAI transforms (seeded).

An episode is a dict of 2D float32 arrays `support_image`, `support_mask`, `query_image`,
`query_mask` (H, W); images in [0, 1], masks in {0, 1}.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import Rand2DElastic, RandAdjustContrast

KEYS = ("support_image", "support_mask", "query_image", "query_mask")


def resize_episode(episode: dict, size: int) -> dict:
    """Resize the four (H, W) arrays to (size, size): images bilinear (antialiased), masks nearest."""
    out = dict(episode)
    for key in KEYS:
        x = torch.as_tensor(np.asarray(episode[key], dtype=np.float32))[None, None]
        if tuple(x.shape[-2:]) != (size, size):
            if key.endswith("mask"):
                x = F.interpolate(x, size=(size, size), mode="nearest")
            else:
                x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[key] = x[0, 0].numpy()
    return out


class EpisodeAugment:
    """RPT's augmentation of one side of an episode (MONAI transforms, deterministic for a seed).

    - gamma in [0.5, 1.5] on the query or the support image (coin flip);
    - geometric on the query or the support (coin flip): rotation ±5°, shear ±5°, translation
      ±5 px (at 256 px; scaled with the slice size), scale 0.9-1.2, and an elastic deformation
      (MONAI Rand2DElastic control-point field), the mask warped with nearest neighbour and
      re-binarised.

    strength: multiplies the rotation, shear, translation and scale ranges (1 = RPT). Larger values
    teach the network to correct larger support/query misalignment (cross-volume supports).
    """

    def __init__(self, size: int, seed: int = 0, gamma: tuple[float, float] = (0.5, 1.5), strength: float = 1.0):
        if not 0 <= strength <= 4:
            raise ValueError(f"augmentation strength must be in [0, 4], got {strength}")
        shift = 5.0 * size / 256 * strength
        shear = math.tan(math.radians(5 * strength))
        scale = ((-0.1 * strength, 0.2 * strength),) * 2
        self.gamma = RandAdjustContrast(prob=1.0, gamma=gamma)
        self.geometric = Rand2DElastic(
            spacing=(max(4, size // 8),) * 2, magnitude_range=(0.0, 1.0), prob=1.0,
            rotate_range=math.radians(5 * strength), shear_range=(shear, shear), translate_range=(shift, shift),
            scale_range=scale, padding_mode="zeros",
        )
        self.rng = np.random.default_rng(seed)
        self.set_random_state(seed)

    def set_random_state(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.gamma.set_random_state(seed=seed)
        self.geometric.set_random_state(seed=seed + 1)

    def _warp(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        stacked = torch.as_tensor(np.stack([image, mask]), dtype=torch.float32)  # (2, H, W)
        self.geometric.randomize(stacked.shape[1:])
        img = self.geometric(stacked[:1], mode="bilinear", randomize=False)
        msk = self.geometric(stacked[1:], mode="nearest", randomize=False)
        return np.asarray(img[0], dtype=np.float32).clip(0, 1), (np.asarray(msk[0]) > 0.5).astype(np.float32)

    def __call__(self, episode: dict) -> dict:
        out = dict(episode)
        side = "query" if self.rng.random() < 0.5 else "support"
        out[f"{side}_image"] = np.asarray(self.gamma(out[f"{side}_image"][None])[0], dtype=np.float32).clip(0, 1)
        side = "query" if self.rng.random() < 0.5 else "support"
        out[f"{side}_image"], out[f"{side}_mask"] = self._warp(out[f"{side}_image"], out[f"{side}_mask"])
        return out
