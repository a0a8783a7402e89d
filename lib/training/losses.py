"""What a training step minimises: the SD-FSMIS episode loss, or the VAE stage's reconstruction loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lib.model.sdfsmis import SDFSMIS

KL_WEIGHT = 1e-6  # VAE stage: KL term weight (as the SD autoencoders)


class EpisodeLoss(nn.Module):
    """forward(batch) -> SD-FSMIS MSE loss; a module so torch DDP can wrap it."""

    def __init__(self, model: SDFSMIS):
        super().__init__()
        self.model = model

    def forward(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.loss(b["support_image"], b["support_mask"], b["query_image"], b["query_mask"])


class VAELoss(nn.Module):
    """forward(batch) -> L1 reconstruction of all images and masks (pseudo-RGB in [-1, 1]) + KL."""

    def __init__(self, model: SDFSMIS):
        super().__init__()
        self.vae = model.vae

    def forward(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        x = torch.cat([b["support_image"], b["support_mask"], b["query_image"], b["query_mask"]])
        rgb = (x * 2 - 1).expand(-1, 3, -1, -1)
        posterior = self.vae.encode(rgb).latent_dist
        rec = self.vae.decode(posterior.sample()).sample
        return F.l1_loss(rec, rgb) + KL_WEIGHT * posterior.kl().mean()


def loss_module(model: SDFSMIS, stage: str) -> nn.Module:
    """The stage's loss as a module (VAELoss for 'vae', else EpisodeLoss)."""
    return VAELoss(model) if stage == "vae" else EpisodeLoss(model)


@torch.no_grad()
def latent_scaling_factor(model: SDFSMIS, batch: dict[str, torch.Tensor]) -> float:
    """1 / std of the VAE latents of images and masks (the SD recipe for `scaling_factor`)."""
    x = torch.cat([batch["support_image"], batch["query_image"], batch["support_mask"], batch["query_mask"]])
    z = model.vae.encode((x * 2 - 1).expand(-1, 3, -1, -1)).latent_dist.mean
    return float(1.0 / z.std().clamp_min(1e-6))
