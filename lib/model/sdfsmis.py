"""SD-FSMIS: the network (frozen VAE, UNet with SII, QE, VTCT) and its single-step pipeline.

Images and masks are (N, 1, S, S) tensors at S = config.image_size; images in [0, 1], masks {0, 1}.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn
from transformers import Dinov2Model

from lib.model.cache import SupportCache
from lib.model.config import ALIGNMENTS, SDFSMISConfig
from lib.model.conv_in import widen_conv_in
from lib.model.prior import BACKBONES, PriorBranch, extend_conv_in
from lib.model.qe import downsample_mask, enhance_query, masked_average
from lib.model.sii import SIIContext, add_sii, sii_parameters
from lib.model.vtct import VTCT


QUERY_PRIORS = ("none", "mask", "image+mask")  # config.query_prior; index + 2 = conv_in_query width factor
MASK_LOGIT_SCALE = 4.0  # decoded value in [-1, 1] -> logit (±1 -> probability 0.98 / 0.02)


def mask_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft Dice per slice (smoothing 1) + BCE on logits: (N, 1, S, S) logits and masks -> scalar.

    The same number as MONAI's `DiceCELoss(sigmoid=True, smooth_nr=1, smooth_dr=1)` (checked in the
    tests); written out because lib/model imports no MONAI (DESIGN §1).
    """
    prob = torch.sigmoid(logits)
    dims = tuple(range(2, logits.ndim))
    dice = 1 - (2 * (prob * target).sum(dims) + 1) / (prob.sum(dims) + target.sum(dims) + 1)
    return dice.mean() + F.binary_cross_entropy_with_logits(logits, target)


class SDFSMIS(nn.Module):
    """The SD-FSMIS network. Build it with `lib.model.build_model`, not directly."""

    def __init__(self, config: SDFSMISConfig, unet: UNet2DConditionModel, vae: AutoencoderKL, encoder: Dinov2Model):
        super().__init__()
        self.config = config
        self.vae = vae.requires_grad_(False).eval()
        latent_channels = vae.config.latent_channels
        if unet.conv_in.in_channels != latent_channels:
            raise ValueError(f"the UNet's conv_in takes {unet.conv_in.in_channels} channels, the VAE gives {latent_channels}")
        self.conv_in_support = widen_conv_in(unet.conv_in, 2)   # [z_s^I, z_s^M]
        # [z_q, p_q] (paper), + z_s^M (prior "mask") or + [z_s^M, z_s^I] (prior "image+mask")
        if config.query_prior not in QUERY_PRIORS:
            raise ValueError(f"query_prior {config.query_prior!r}: choose one of {' | '.join(QUERY_PRIORS)}")
        self.conv_in_query = widen_conv_in(unet.conv_in, 2 + QUERY_PRIORS.index(config.query_prior))
        if config.align_support not in ALIGNMENTS:
            raise ValueError(f"align_support {config.align_support!r}: choose one of {' | '.join(ALIGNMENTS)}")
        if config.edit_prior and not config.prior_residual:
            raise ValueError("edit_prior needs prior_residual (the network's output must be a change of the prior)")
        if config.prior_residual:
            # the UNet predicts a correction of the support-mask latent; zero output conv: starts as a copy
            if config.query_prior == "none":
                raise ValueError("prior_residual needs a query_prior ('mask' or 'image+mask')")
            nn.init.zeros_(unet.conv_out.weight)
            nn.init.zeros_(unet.conv_out.bias)
        self.prior_net = None
        if config.prior_backbone not in BACKBONES:
            raise ValueError(f"prior_backbone {config.prior_backbone!r}: choose one of {' | '.join(BACKBONES)}")
        if config.prior_backbone != "none":   # + pretrained feature maps (and the query's organ logit)
            self.prior_net = PriorBranch(config.prior_size, config.latent_size, config.n_tokens,
                                         unet.config.cross_attention_dim, config.vtct_hidden, trainable=config.train_prior)
            self.conv_in_support = extend_conv_in(self.conv_in_support, self.prior_net.support_channels)
            self.conv_in_query = extend_conv_in(self.conv_in_query, self.prior_net.query_channels)
        unet.conv_in = nn.Identity()                            # each branch applies its own conv first
        unet.register_to_config(in_channels=2 * latent_channels)
        self.sii_blocks = len(add_sii(unet))
        self.unet = unet
        self.vtct = VTCT(encoder, config.dino_size, config.n_tokens, config.vtct_hidden, unet.config.cross_attention_dim)
        if not config.train_encoder:
            self.vtct.encoder.requires_grad_(False).eval()
        self.register_buffer("timestep", torch.tensor(config.timestep, dtype=torch.long), persistent=False)
        self.autocast_dtype: torch.dtype | None = None  # set by the fast path on CUDA (fp16 / bf16)

    # ---- parts -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.timestep.device

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    def train(self, mode: bool = True) -> "SDFSMIS":
        super().train(mode)
        self.vae.eval()
        if not self.config.train_encoder:
            self.vtct.encoder.eval()
        if self.prior_net is not None:
            self.prior_net.train(mode)
        return self

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by learning-rate group: 'unet' (pretrained), 'new' (MLP, conv_in, SII) and
        'prior' (the pretrained prior's backbone when `config.train_prior`, else empty)."""
        sii = {id(p) for p in sii_parameters(self.unet)}
        new = list(self.conv_in_support.parameters()) + list(self.conv_in_query.parameters())
        new += sii_parameters(self.unet) + list(self.vtct.mlp.parameters()) + list(self.vtct.norm.parameters())
        if self.prior_net is not None:
            new += list(self.prior_net.mlp.parameters())
        if self.config.train_encoder:
            new += list(self.vtct.encoder.parameters())
        unet = [p for p in self.unet.parameters() if id(p) not in sii]
        prior = [p for p in self.prior_net.features.parameters() if p.requires_grad] if self.prior_net is not None else []
        return {"unet": unet, "new": [p for p in new if p.requires_grad], "prior": prior}

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Pseudo-RGB + frozen VAE: (N, 1, S, S) in [0, 1] -> latents (N, 4, s, s), mean * scaling."""
        rgb = (x.to(self.vae.dtype) * 2 - 1).expand(-1, 3, -1, -1)
        return self.vae.encode(rgb).latent_dist.mean * self.scaling_factor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (N, 4, s, s) -> mask probability (N, 1, S, S): clamp, [0, 1], mean of 3 channels."""
        return ((self._decode_rgb(z).clamp(-1, 1) + 1) / 2).mean(dim=1, keepdim=True)

    def _decode_rgb(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (N, 4, s, s) -> the VAE decoder's float output (N, 3, S, S), about [-1, 1]."""
        return self.vae.decode(z.to(self.vae.dtype) / self.scaling_factor).sample.float()

    def _unet(self, x: torch.Tensor, embedding: torch.Tensor, ctx: SIIContext) -> torch.Tensor:
        t = self.timestep.expand(x.shape[0])
        return self.unet(x, t, encoder_hidden_states=embedding, cross_attention_kwargs={"sii": ctx}).sample

    # ---- the two branches --------------------------------------------------------------------
    def support_branch(self, images: torch.Tensor, masks: torch.Tensor, groups: int = 1) -> SupportCache:
        """G supports of k shots: images, masks (G*k, 1, S, S) -> SupportCache (with grad if enabled)."""
        n = images.shape[0]
        if n % groups:
            raise ValueError(f"{n} support slices cannot be split into {groups} supports")
        k = n // groups
        masks = masks.to(images.dtype)
        z_img, z_mask = self.encode(images), self.encode(masks)
        prototype = masked_average(z_img.float(), downsample_mask(masks, z_img.shape[-1]), groups)
        x, protos, term = torch.cat([z_img, z_mask], dim=1), None, None
        if self.prior_net is not None:
            maps, protos, term = self.prior_net.support(images, masks, groups)
            x = torch.cat([x, maps.to(x.dtype)], dim=1)
        embedding = self.vtct(images, masks, groups, term)                 # (G, T, D)
        ctx = SIIContext("store")
        x = self.conv_in_support(x)
        self._unet(x, embedding.repeat_interleave(k, dim=0), ctx)
        tokens = {i: t.reshape(groups, -1, t.shape[-1]) for i, t in ctx.tokens.items()}
        return SupportCache(prototype, embedding, tokens, k, self._prior(z_img, z_mask, groups), protos)

    def _prior(self, z_img: torch.Tensor, z_mask: torch.Tensor, groups: int) -> torch.Tensor | None:
        """Support latents (G*k, C, h, w) -> the query prior (G, n*C, h, w), mean over shots; None for "none"."""
        parts = {"none": [], "mask": [z_mask], "image+mask": [z_mask, z_img]}[self.config.query_prior]
        if not parts:
            return None
        x = torch.cat(parts, dim=1)
        return x.reshape(groups, -1, *x.shape[1:]).mean(dim=1)

    def query_branch(self, images: torch.Tensor, cache: SupportCache, index: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """Query images (B, 1, S, S) + cache of 1 or B supports -> predicted mask latents (B, 4, s, s).

        index: long (B',): the query image of each of B' queries, when several supports segment the same
        slice (images (B, 1, S, S) are then the B distinct slices, each encoded once; the result is (B', 4, s, s)).
        With `config.prior_residual` the UNet output is added to the support-mask latent z_s^M (prior).
        """
        z_q = self.encode(images)
        if index is not None:
            z_q = z_q[index.to(z_q.device)]
        extra, match = None, None
        if self.prior_net is not None:
            if cache.prototypes is None:
                raise ValueError("this model needs the support's pretrained prototypes: encode the support with this model")
            extra, match = self.prior_net.query(images, cache.prototypes, index)
        x = enhance_query(cache.prototype, z_q, self.config.qe_threshold, match).to(z_q.dtype)
        if self.config.query_prior != "none":
            if cache.prior is None:
                raise ValueError("this model needs the support prior latents: encode the support with this model")
            x = torch.cat([x, cache.prior.to(x.dtype).expand(x.shape[0], -1, -1, -1)], dim=1)
        if extra is not None:
            x = torch.cat([x, extra.to(x.dtype)], dim=1)
        x = self.conv_in_query(x)
        emb = cache.embedding
        if emb.shape[0] != x.shape[0]:
            emb = emb.expand(x.shape[0], -1, -1)
        out = self._unet(x, emb, SIIContext("inject", cache.tokens))
        if self.config.prior_residual:
            out = out + cache.prior[:, :out.shape[1]].to(out.dtype)   # z_s^M comes first in the prior
        return out

    # ---- the network -------------------------------------------------------------------------
    def forward(self, query: torch.Tensor, support_images: torch.Tensor, support_masks: torch.Tensor) -> torch.Tensor:
        """One SD-FSMIS step: query (B, 1, S, S) in [0, 1], support images and masks (B, k, S, S) (k shots per
        query, masks {0, 1}) -> predicted query-mask latents (B, C, s, s) (`decode` -> probabilities).
        Gradients flow through both branches; inference uses `encode_support` + `predict` (cached)."""
        b, k = support_images.shape[:2]
        cache = self.support_branch(support_images.reshape(b * k, 1, *support_images.shape[-2:]),
                                    support_masks.reshape(b * k, 1, *support_masks.shape[-2:]), groups=b)
        return self.query_branch(query, cache)

    # ---- training ----------------------------------------------------------------------------
    def loss(self, support_images, support_masks, query_images, query_masks) -> torch.Tensor:
        """Episodes, 1 shot each, (B, 1, S, S) tensors -> MSE(predicted latent, query-mask latent).

        With `config.mask_loss_weight` > 0, plus that weight times Dice + BCE of the decoded mask
        (`mask_loss`): the frozen decoder passes gradients, so a small organ weighs as much as the
        background that dominates the latent MSE.
        """
        pred = self(query_images, support_images, support_masks)           # (B, 1, S, S) supports: k = 1
        with torch.no_grad():
            target = self.encode(query_masks.to(query_images.dtype))
        loss = F.mse_loss(pred.float(), target.float())
        if self.config.mask_loss_weight > 0:
            loss = loss + self.config.mask_loss_weight * mask_loss(self.decode_logits(pred), query_masks.float())
        return loss

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (N, 4, s, s) -> mask logits (N, 1, S, S): MASK_LOGIT_SCALE * mean decoded channel.

        Logit 0 is decoded value 0, i.e. 0.5 in `decode` (which clamps each channel to [-1, 1] first).
        """
        return MASK_LOGIT_SCALE * self._decode_rgb(z).mean(dim=1, keepdim=True)

    # ---- inference ---------------------------------------------------------------------------
    def _autocast(self):
        if self.autocast_dtype is None or self.device.type == "cpu":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @torch.inference_mode()
    def encode_support(self, images: torch.Tensor, masks: torch.Tensor) -> SupportCache:
        """k annotated slices (k, 1, S, S) -> the SupportCache of one k-shot support."""
        with self._autocast():
            return self.support_branch(images.to(self.device), masks.to(self.device), groups=1)

    @torch.inference_mode()
    def encode_supports(self, images: torch.Tensor, masks: torch.Tensor) -> SupportCache:
        """G one-shot supports at once, (G, 1, S, S) each -> one SupportCache of G groups (`predict`
        then takes one query per group)."""
        with self._autocast():
            return self.support_branch(images.to(self.device), masks.to(self.device), groups=images.shape[0])

    @torch.inference_mode()
    def predict(self, query_images: torch.Tensor, cache: SupportCache, index: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Query images (B, 1, S, S) -> mask probabilities (B, 1, S, S) in [0, 1].

        index: long (B',) into the B images, one per query, for B' queries of fewer distinct slices (organs
        walking from one slice: the query's VAE encoding is the only image-only part of the query branch,
        computed once per slice) -> (B', 1, S, S); the cache then holds 1 or B' supports."""
        with self._autocast():
            return self.decode(self.query_branch(query_images.to(self.device), cache, index)).float()

    @torch.inference_mode()
    def decode_prior(self, cache: SupportCache) -> torch.Tensor:
        """The support-mask latent of the query prior, decoded: (G, 1, S, S) in [0, 1] (what a
        `prior_residual` model predicts when it changes nothing)."""
        if cache.prior is None:
            raise ValueError("this model has no query prior")
        c = self.vae.config.latent_channels
        with self._autocast():
            return self.decode(cache.prior[:, :c]).float()
