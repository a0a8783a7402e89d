"""ALPNet-style prototype matching on pretrained features (the training-free floor of issue 18, and
the pretrained prior's QE inside SD-FSMIS, lib.model.prior).

One organ prototype (masked average over the support's organ) and local background prototypes
(masked averages over a grid of windows that hold mostly background, as SSL-ALPNet's local
prototypes); a query position matches the organ where its cosine similarity to the organ prototype
beats the best background one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lib.model.qe import masked_average

SCALE = 20.0   # cosine -> logit scale (ALPNet / PANet)


def prototypes(features: torch.Tensor, masks: torch.Tensor, groups: int = 1, grid: int = 4,
               background: float = 0.95) -> torch.Tensor:
    """G supports of k shots: features (G*k, C, h, w), masks (G*k, 1, H, W) {0, 1} -> (G, 1 + k*grid², C):
    the organ's masked average first, then the background of each grid x grid window of each shot;
    a window whose background fraction is below `background` takes the support's whole-background
    average instead (so every group has the same number of prototypes)."""
    n, c, h, w = features.shape
    fg = F.adaptive_avg_pool2d(masks.float(), (h, w))                            # area fractions
    bg = 1 - fg
    proto_fg = masked_average(features, fg, groups)                              # (G, C)
    proto_bg = masked_average(features, bg, groups)                              # (G, C)
    win_f = F.adaptive_avg_pool2d(features * bg, grid).flatten(2)                # (G*k, C, g*g)
    win_w = F.adaptive_avg_pool2d(bg, grid).flatten(2)                           # (G*k, 1, g*g)
    local = (win_f / win_w.clamp_min(1e-6)).permute(0, 2, 1).reshape(groups, -1, c)   # (G, k*g*g, C)
    keep = (win_w[:, 0] >= background).reshape(groups, -1, 1)
    local = torch.where(keep, local, proto_bg[:, None])
    return torch.cat([proto_fg[:, None], local], dim=1)


def foreground_logit(features: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """Query features (B, C, h, w), prototypes (1 or B, 1 + P, C) -> (B, 1, h, w) organ logit:
    SCALE x (cos to the organ prototype - the best cos to a background prototype)."""
    f = F.normalize(features, dim=1)
    p = F.normalize(protos, dim=2)
    sim = torch.einsum("bchw,bpc->bphw", f, p.expand(f.shape[0], -1, -1))     # (B, 1+P, h, w)
    return SCALE * (sim[:, :1] - sim[:, 1:].amax(dim=1, keepdim=True))
