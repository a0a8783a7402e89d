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


def match_offsets(query: torch.Tensor, support: torch.Tensor, mask: torch.Tensor, margin: int = 1,
                  reach: int = 10, window: int = 3) -> torch.Tensor:
    """Where the support's organ is in each query slice, by feature template matching (a translation).

    query (N, C, h, w) features of consecutive query slices, support (1, C, h, w), mask (1, 1, h, w) the
    organ's area fractions on the feature grid -> long (N, 2): the (dy, dx) shift in feature cells,
    within +-`reach`, that best matches the template (the support's features over the organ's bounding
    box grown by `margin` cells; mean cosine similarity) to the query; each slice takes the best shift
    of its score maps averaged over +-`window` neighbouring slices (one organ moves little between
    slices, and one slice alone is noisy). An empty mask gives no shift."""
    n = query.shape[0]
    organ = mask[0, 0] > 0.25
    if not organ.any():
        return torch.zeros(n, 2, dtype=torch.long)
    h, w = organ.shape
    ys, xs = torch.nonzero(organ, as_tuple=True)
    y0, y1 = max(int(ys.min()) - margin, 0), min(int(ys.max()) + margin, h - 1)
    x0, x1 = max(int(xs.min()) - margin, 0), min(int(xs.max()) + margin, w - 1)
    template = F.normalize(support.float(), dim=1)[:, :, y0:y1 + 1, x0:x1 + 1]          # (1, C, th, tw)
    padded = F.pad(F.normalize(query.float(), dim=1), (reach,) * 4)
    region = padded[:, :, y0:y1 + 1 + 2 * reach, x0:x1 + 1 + 2 * reach]
    score = F.conv2d(region, template)[:, 0] / template[0, 0].numel()                    # (N, 2r+1, 2r+1)
    csum = torch.cat([torch.zeros_like(score[:1]), score.cumsum(0)])
    idx = torch.arange(n)
    lo, hi = (idx - window).clamp_min(0), (idx + window + 1).clamp_max(n)
    smooth = (csum[hi] - csum[lo]).flatten(1).argmax(dim=1)                              # (N,)
    side = 2 * reach + 1
    return torch.stack([smooth // side, smooth % side], dim=1) - reach
