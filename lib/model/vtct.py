"""VTCT: Visual-to-Textual Condition Translator (support image + mask -> text-like embedding)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Dinov2Model

from lib.model.qe import downsample_mask

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VTCT(nn.Module):
    """Dinov2Model -> masked average of patch tokens -> MLP -> (S, n_tokens, cross_attention_dim)."""

    def __init__(self, encoder: Dinov2Model, image_size: int, n_tokens: int, hidden: int, out_dim: int):
        super().__init__()
        patch = encoder.config.patch_size
        if image_size % patch:
            raise ValueError(f"VTCT input size {image_size} is not a multiple of the patch size {patch}")
        self.encoder = encoder
        mask_token = getattr(encoder.embeddings, "mask_token", None)
        if mask_token is not None:  # DINOv2's masked-image-modelling token: never used by VTCT
            mask_token.requires_grad_(False)
        self.image_size = image_size
        self.grid = image_size // patch
        self.n_tokens = n_tokens
        self.out_dim = out_dim
        dim = encoder.config.hidden_size
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, n_tokens * out_dim)
        )
        self.norm = nn.LayerNorm(out_dim)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) in [0, 1] -> patch tokens (N, grid*grid, D), CLS and register tokens dropped."""
        x = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        x = (x.expand(-1, 3, -1, -1) - self.mean) / self.std
        hidden = self.encoder(pixel_values=x).last_hidden_state
        skip = 1 + getattr(self.encoder.config, "num_register_tokens", 0)
        return hidden[:, skip:]

    def pool(self, tokens: torch.Tensor, masks: torch.Tensor, groups: int) -> torch.Tensor:
        """Masked average over k shots' patches: tokens (G*k, P, D), masks (G*k, 1, H, W) -> (G, D)."""
        w = downsample_mask(masks, self.grid).flatten(1)            # (G*k, P)
        n, p, d = tokens.shape
        num = (tokens * w.unsqueeze(-1)).reshape(groups, -1, d).sum(1)
        den = w.reshape(groups, -1).sum(1, keepdim=True)
        return num / den.clamp_min(1e-6)

    def forward(self, images: torch.Tensor, masks: torch.Tensor, groups: int,
                extra: torch.Tensor | None = None) -> torch.Tensor:
        """Support images/masks (G*k, 1, H, W) -> text-like embedding (G, n_tokens, out_dim); `extra`
        (G, n_tokens, out_dim) is added before the norm (the pretrained prior's term, lib.model.prior)."""
        proto = self.pool(self.patch_tokens(images), masks, groups)
        tokens = self.mlp(proto).view(groups, self.n_tokens, self.out_dim)
        return self.norm(tokens if extra is None else tokens + extra)
