"""The pretrained prior inside SD-FSMIS (config `prior_backbone`): where the paper puts its pretrained
parts, a frozen ImageNet EfficientNet-Lite2 (lib.model.backbone) adds

- to VTCT: the masked average of the support's feature map -> MLP -> a term added to the text-like
  tokens (beside the VTCT encoder's own; zero-initialised, so a warm-started model starts unchanged);
- to QE: the query positions that match the support's organ on the pretrained features (organ
  prototype vs. local background prototypes, lib.model.prototypes) choose the query prototype p_q;
- to the widened conv_in: the feature maps (support and query) and the query's organ logit map,
  beside the latents (zero-initialised input channels).

Frozen by default, as the paper freezes DINOv2; `config.train_prior` fine-tunes it (at the recipe's
lr_prior) and the checkpoint then stores it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lib.model.backbone import PretrainedFeatures
from lib.model.prototypes import SCALE, foreground_logit, prototypes

BACKBONES = ("none", "efficientnet-lite2")   # config.prior_backbone


def extend_conv_in(conv: nn.Conv2d, extra: int) -> nn.Conv2d:
    """(C_in -> C) conv -> (C_in + extra -> C) conv: the original weights on the first C_in input
    channels, zeros on the new ones (the same output as before whatever the new inputs hold)."""
    new = nn.Conv2d(conv.in_channels + extra, conv.out_channels, kernel_size=conv.kernel_size,
                    stride=conv.stride, padding=conv.padding, bias=conv.bias is not None)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :conv.in_channels].copy_(conv.weight)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new.to(device=conv.weight.device, dtype=conv.weight.dtype)


class PriorBranch(nn.Module):
    """Frozen features + the VTCT term. size: backbone input H = W; latent: H = W of the VAE latents
    (feature maps are resized to it); tokens / dim / hidden: VTCT's n_tokens, cross-attention width
    and MLP width."""

    def __init__(self, size: int, latent: int, tokens: int, dim: int, hidden: int, pretrained: bool = True,
                 trainable: bool = False):
        super().__init__()
        self.trainable = trainable                  # fine-tuned (BatchNorm statistics stay ImageNet's)
        self.features = PretrainedFeatures(pretrained).requires_grad_(trainable).eval()
        self.size, self.latent, self.tokens, self.dim = size, latent, tokens, dim
        c = PretrainedFeatures.channels
        self.mlp = nn.Sequential(nn.Linear(c, hidden), nn.GELU(), nn.Linear(hidden, tokens * dim))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    @property
    def support_channels(self) -> int:
        return PretrainedFeatures.channels

    @property
    def query_channels(self) -> int:
        return PretrainedFeatures.channels + 1      # + the organ logit map

    def train(self, mode: bool = True) -> "PriorBranch":
        super().train(mode)
        self.features.eval()                        # frozen BatchNorm statistics
        return self

    def maps(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 1, S, S) in [0, 1] -> feature maps (N, C, latent, latent)."""
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            f = self.features.embed(images, self.size)
        if f.shape[-1] != self.latent:
            f = F.interpolate(f, size=(self.latent, self.latent), mode="bilinear")
        return f.to(images.dtype)

    def support(self, images: torch.Tensor, masks: torch.Tensor, groups: int):
        """Support shots (G*k, 1, S, S) -> (feature maps (G*k, C, l, l), prototypes (G, 1 + P, C),
        VTCT term (G, tokens, dim))."""
        f = self.maps(images)
        protos = prototypes(f.float(), masks.float(), groups)
        term = self.mlp(protos[:, 0].to(f.dtype)).view(groups, self.tokens, self.dim)
        return f, protos, term

    def query(self, images: torch.Tensor, protos: torch.Tensor, index: torch.Tensor | None = None):
        """Queries (B, 1, S, S), prototypes (1 or B', 1 + P, C) -> (UNet inputs [maps, logit / SCALE]
        (B', C + 1, l, l), organ match bool (B', 1, l, l) for QE); `index` long (B',) picks each query's
        slice among the B images (SDFSMIS.predict), B' = B without it."""
        f = self.maps(images)
        if index is not None:
            f = f[index.to(f.device)]
        logit = foreground_logit(f.float(), protos).to(f.dtype)
        return torch.cat([f, logit / SCALE], dim=1), logit > 0
