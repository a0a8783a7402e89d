"""SD-FSMIS: the network (frozen VAE, UNet with SII, QE, VTCT) and its single-step pipeline.

Images and masks are (N, 1, S, S) tensors at S = config.image_size; images in [0, 1], masks {0, 1}.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn
from transformers import Dinov2Model

from lib.model.cache import SupportCache
from lib.model.config import ALIGNMENTS, SDFSMISConfig
from lib.model.conv_in import widen_conv_in
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
        return self

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by learning-rate group: 'unet' (pretrained) and 'new' (MLP, conv_in, SII)."""
        sii = {id(p) for p in sii_parameters(self.unet)}
        new = list(self.conv_in_support.parameters()) + list(self.conv_in_query.parameters())
        new += sii_parameters(self.unet) + list(self.vtct.mlp.parameters()) + list(self.vtct.norm.parameters())
        if self.config.train_encoder:
            new += list(self.vtct.encoder.parameters())
        unet = [p for p in self.unet.parameters() if id(p) not in sii]
        return {"unet": unet, "new": [p for p in new if p.requires_grad]}

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
        embedding = self.vtct(images, masks, groups)                       # (G, T, D)
        ctx = SIIContext("store")
        x = self.conv_in_support(torch.cat([z_img, z_mask], dim=1))
        self._unet(x, embedding.repeat_interleave(k, dim=0), ctx)
        tokens = {i: t.reshape(groups, -1, t.shape[-1]) for i, t in ctx.tokens.items()}
        return SupportCache(prototype, embedding, tokens, k, self._prior(z_img, z_mask, groups))

    def _prior(self, z_img: torch.Tensor, z_mask: torch.Tensor, groups: int) -> torch.Tensor | None:
        """Support latents (G*k, C, h, w) -> the query prior (G, n*C, h, w), mean over shots; None for "none"."""
        parts = {"none": [], "mask": [z_mask], "image+mask": [z_mask, z_img]}[self.config.query_prior]
        if not parts:
            return None
        x = torch.cat(parts, dim=1)
        return x.reshape(groups, -1, *x.shape[1:]).mean(dim=1)

    def query_branch(self, images: torch.Tensor, cache: SupportCache) -> torch.Tensor:
        """Query images (B, 1, S, S) + cache of 1 or B supports -> predicted mask latents (B, 4, s, s).

        With `config.prior_residual` the UNet output is added to the support-mask latent z_s^M (prior).
        """
        z_q = self.encode(images)
        x = enhance_query(cache.prototype, z_q, self.config.qe_threshold).to(z_q.dtype)
        if self.config.query_prior != "none":
            if cache.prior is None:
                raise ValueError("this model needs the support prior latents: encode the support with this model")
            x = torch.cat([x, cache.prior.to(x.dtype).expand(x.shape[0], -1, -1, -1)], dim=1)
        x = self.conv_in_query(x)
        emb = cache.embedding
        if emb.shape[0] != x.shape[0]:
            emb = emb.expand(x.shape[0], -1, -1)
        out = self._unet(x, emb, SIIContext("inject", cache.tokens))
        if self.config.prior_residual:
            out = out + cache.prior[:, :out.shape[1]].to(out.dtype)   # z_s^M comes first in the prior
        return out

    # ---- training ----------------------------------------------------------------------------
    def loss(self, support_images, support_masks, query_images, query_masks) -> torch.Tensor:
        """Episodes, 1 shot each, (B, 1, S, S) tensors -> MSE(predicted latent, query-mask latent).

        With `config.mask_loss_weight` > 0, plus that weight times Dice + BCE of the decoded mask
        (`mask_loss`): the frozen decoder passes gradients, so a small organ weighs as much as the
        background that dominates the latent MSE.
        """
        cache = self.support_branch(support_images, support_masks, groups=support_images.shape[0])
        pred = self.query_branch(query_images, cache)
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
    def predict(self, query_images: torch.Tensor, cache: SupportCache) -> torch.Tensor:
        """Query images (B, 1, S, S) -> mask probabilities (B, 1, S, S) in [0, 1]."""
        with self._autocast():
            return self.decode(self.query_branch(query_images.to(self.device), cache)).float()

    @torch.inference_mode()
    def decode_prior(self, cache: SupportCache) -> torch.Tensor:
        """The support-mask latent of the query prior, decoded: (G, 1, S, S) in [0, 1] (what a
        `prior_residual` model predicts when it changes nothing)."""
        if cache.prior is None:
            raise ValueError("this model has no query prior")
        c = self.vae.config.latent_channels
        with self._autocast():
            return self.decode(cache.prior[:, :c]).float()

    @torch.inference_mode()
    def predict_uncached(self, query_images, support_images, support_masks) -> torch.Tensor:
        """As `predict`, recomputing the support branch for every query (the reference behaviour)."""
        b, k = query_images.shape[0], support_images.shape[0]
        cache = self.support_branch(
            support_images.repeat(b, 1, 1, 1).to(self.device), support_masks.repeat(b, 1, 1, 1).to(self.device), groups=b
        )
        assert cache.shots == k
        return self.decode(self.query_branch(query_images.to(self.device), cache)).float()

    def segment(self, query_images, support_images, support_masks, batch_size: int = 8,
                threshold: float | None = None, return_probs: bool = False, align=None) -> torch.Tensor:
        """Any slice size, numpy or torch. query (N, H, W) in [0, 1]; support images/masks (k, H', W').

        One k-shot support serves all N queries (support branch once). With `align` (a callable
        (query (H, W), support image (H, W), support mask (H, W)) -> (image, mask), e.g.
        lib.transforms.align.SliceAligner.align; 1-shot, one slice grid), every query gets the support
        warped onto it instead, and the support branch runs once per query (`segment_pairs`).
        Returns bool (N, H, W) on CPU (or the float probabilities with return_probs=True).
        """
        q = _as_slices(query_images, "query_images")
        s_img = _as_slices(support_images, "support_images")
        s_mask = _as_slices(support_masks, "support_masks")
        if s_img.shape != s_mask.shape:
            raise ValueError(f"support images {tuple(s_img.shape)} and masks {tuple(s_mask.shape)} differ in shape")
        if not (s_mask > 0.5).any():
            raise ValueError("the support mask is empty: annotate the organ on the support slice")
        if align is not None:
            if s_img.shape[0] != 1:
                raise ValueError(f"an aligned support is 1-shot, got {s_img.shape[0]} support slices")
            pairs = [align(qi[0].numpy(), s_img[0, 0].numpy(), s_mask[0, 0].numpy() > 0.5) for qi in q]
            return self.segment_pairs(q[:, 0], np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]),
                                      batch_size, threshold, return_probs)
        size, thr = self.config.image_size, self._thr(threshold)
        cache = self.encode_support(resize_slices(s_img, size), (resize_slices(s_mask, size) > 0.5).float())
        edit = self.config.edit_prior and s_mask.shape[0] == 1
        if edit:
            prior = resize_slices(self.decode_prior(cache).cpu(), q.shape[-2:])[:, 0]          # (1, H, W)
            prior_mask = resize_slices(s_mask, q.shape[-2:])[:, 0] > 0.5
        out = []
        for start in range(0, q.shape[0], max(1, batch_size)):
            chunk = q[start:start + batch_size]
            probs = resize_slices(self.predict(resize_slices(chunk, size), cache).cpu(), q.shape[-2:])[:, 0]
            out.append(apply_prior_edits(probs, prior, prior_mask, thr) if edit else probs)
        probs = torch.cat(out) if out else torch.zeros(q.shape[0], *q.shape[-2:])
        return probs if return_probs else probs > thr

    def segment_pairs(self, query_images, support_images, support_masks, batch_size: int = 8,
                      threshold: float | None = None, return_probs: bool = False) -> torch.Tensor:
        """N queries (N, H, W), each with its own 1-shot support (N, H', W') -> bool (N, H, W) on CPU
        (or probabilities). The support branch runs for every pair, `batch_size` pairs at a time."""
        q = _as_slices(query_images, "query_images")
        s_img = _as_slices(support_images, "support_images")
        s_mask = _as_slices(support_masks, "support_masks")
        if not (q.shape[0] == s_img.shape[0] == s_mask.shape[0]) or s_img.shape != s_mask.shape:
            raise ValueError(f"pairs need one support per query: query {tuple(q.shape)}, support images "
                             f"{tuple(s_img.shape)}, masks {tuple(s_mask.shape)}")
        size, thr, full = self.config.image_size, self._thr(threshold), q.shape[-2:]
        out = []
        for start in range(0, q.shape[0], max(1, batch_size)):
            sl = slice(start, start + max(1, batch_size))
            masks = resize_mask(s_mask[sl], size).float()
            if not masks.flatten(1).any(dim=1).all():
                raise ValueError("a support mask is empty: every pair needs the organ on its support slice")
            with torch.inference_mode(), self._autocast():
                cache = self.support_branch(resize_slices(s_img[sl], size).to(self.device), masks.to(self.device),
                                            groups=masks.shape[0])
                probs = self.decode(self.query_branch(resize_slices(q[sl], size).to(self.device), cache)).float()
            probs = resize_slices(probs.cpu(), full)[:, 0]
            if self.config.edit_prior:
                prior = resize_slices(self.decode_prior(cache).cpu(), full)[:, 0]
                probs = apply_prior_edits(probs, prior, resize_slices(s_mask[sl], full)[:, 0] > 0.5, thr)
            out.append(probs)
        probs = torch.cat(out) if out else torch.zeros(q.shape[0], *full)
        return probs if return_probs else probs > thr

    def _thr(self, threshold: float | None) -> float:
        return float(self.config.threshold if threshold is None else threshold)


def apply_prior_edits(probs, prior_probs, prior_masks, threshold: float):
    """The network's changes applied to the full-resolution prior (config `edit_prior`).

    probs, prior_probs: (N, H, W) probabilities of the prediction and of the decoded support-mask
    latent (what a `prior_residual` network predicts when it changes nothing), both upsampled from
    network size; prior_masks: (N, H, W) the support masks on the query grid. Where the two decisions
    at `threshold` agree, the network left the prior alone, and the prior mask's own pixels (1 / 0) are
    kept; elsewhere the network's probability. torch or numpy in, the same out.
    """
    if torch.is_tensor(probs):
        same = (probs > threshold) == (prior_probs > threshold)
        return torch.where(same, torch.as_tensor(prior_masks).to(probs.dtype), probs)
    same = (np.asarray(probs) > threshold) == (np.asarray(prior_probs) > threshold)
    return np.where(same, np.asarray(prior_masks, dtype=np.float32), probs).astype(np.float32)


def _as_slices(x, name: str) -> torch.Tensor:
    """(N, H, W) or (H, W) array/tensor -> float32 (N, 1, H, W) CPU tensor."""
    t = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).float().cpu()
    if t.ndim == 2:
        t = t[None]
    if t.ndim != 3:
        raise ValueError(f"{name} must be (N, H, W) slices, got shape {tuple(t.shape)}")
    return t[:, None]


def resize_mask(mask, size) -> torch.Tensor:
    """(N, H, W) or (N, 1, H, W) binary mask -> bool (N, 1, *size): > 0.5 after `resize_slices`, or any
    coverage at all on a slice where that leaves nothing (a tiny organ must survive the shrink to network size)."""
    small = resize_slices(mask, size)
    strict = small > 0.5
    empty = ~strict.flatten(1).any(dim=1)                      # per slice: nothing above 0.5 left
    return torch.where(empty.view(-1, 1, 1, 1), small > 0, strict)


def resize_slices(x, size) -> torch.Tensor:
    """(N, H, W) or (N, 1, H, W) array/tensor -> float32 (N, 1, *size), bilinear (antialiased when shrinking)."""
    t = torch.as_tensor(np.ascontiguousarray(x) if not torch.is_tensor(x) else x).float()
    if t.ndim == 3:
        t = t[:, None]
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(t.shape[-2:]) == size:
        return t
    return F.interpolate(t, size=size, mode="bilinear", antialias=True, align_corners=False)
