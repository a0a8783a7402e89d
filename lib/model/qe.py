"""QE: Query Enhancement, a query prototype picked by similarity to the support prototype."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_average(features: torch.Tensor, weights: torch.Tensor, groups: int) -> torch.Tensor:
    """MAP over k shots and positions.

    features (G*k, C, h, w), weights (G*k, 1, h, w) in [0, 1] -> prototypes (G, C).
    A group whose weights are all zero gets a zero prototype.
    """
    n, c = features.shape[:2]
    f = (features * weights).reshape(groups, n // groups, c, -1).sum(dim=(1, 3))
    w = weights.reshape(groups, -1).sum(dim=1, keepdim=True)
    return f / w.clamp_min(1e-6)


def downsample_mask(masks: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 1, H, W) -> (N, 1, size, size) area fractions (area downsampling)."""
    return F.adaptive_avg_pool2d(masks.float(), (size, size))


def query_prototype(support_proto: torch.Tensor, query_latent: torch.Tensor, threshold: float,
                    match: torch.Tensor | None = None) -> torch.Tensor:
    """p_q = mean of z_q where cos(p_s, z_q) > threshold (or where `match`, bool (B, 1, h, w), holds:
    the pretrained prior's choice), else p_s.

    support_proto (S, C) with S = 1 or B; query_latent (B, C, h, w) -> (B, C).
    """
    b = query_latent.shape[0]
    p_s = support_proto.expand(b, -1) if support_proto.shape[0] == 1 else support_proto
    if match is None:
        match = (F.cosine_similarity(p_s[:, :, None, None], query_latent, dim=1) > threshold).unsqueeze(1)
    keep = match.to(query_latent.dtype)                                     # (B, 1, h, w)
    count = keep.sum(dim=(1, 2, 3))
    p_q = (query_latent * keep).sum(dim=(2, 3)) / count.clamp_min(1).unsqueeze(1)
    return torch.where((count > 0).unsqueeze(1), p_q, p_s.to(query_latent.dtype))


def enhance_query(support_proto: torch.Tensor, query_latent: torch.Tensor, threshold: float,
                  match: torch.Tensor | None = None) -> torch.Tensor:
    """Query UNet input [z_q, p_q expanded]: (B, C, h, w) -> (B, 2C, h, w)."""
    p_q = query_prototype(support_proto, query_latent, threshold, match)
    return torch.cat([query_latent, p_q[:, :, None, None].expand_as(query_latent)], dim=1)
