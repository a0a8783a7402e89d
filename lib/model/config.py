"""SD-FSMIS configuration: one dataclass that records the architecture and every inference default."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

ALIGNMENTS = ("none", "registration")  # align_support values (lib.transforms.align does the registration)
# Training settings that older checkpoints recorded here; they now live in lib.training.recipe.
LEGACY_TRAINING_KEYS = ("lr_unet", "lr_new", "weight_decay", "batch_size", "iterations")


@dataclass
class SDFSMISConfig:
    """Everything needed to rebuild a model and run it as it was trained.

    unet / vae / dino are the diffusers UNet2DConditionModel, AutoencoderKL and transformers
    Dinov2Config dictionaries; the rest are the SD-FSMIS choices (paper values for `sd15`). How a
    model is trained (learning rates, batch, iterations) is its recipe, not part of this config.
    """

    preset: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    dino: dict[str, Any]
    image_size: int = 256          # network input H = W [256]
    dino_size: int = 224           # VTCT encoder input H = W (multiple of the patch size)
    n_tokens: int = 4              # VTCT text-like tokens (the paper leaves N open)
    vtct_hidden: int = 768         # VTCT MLP hidden width
    qe_threshold: float = 0.7      # QE cosine-similarity threshold [0.7]
    timestep: int = 999            # single-step conditioning timestep [999]
    threshold: float = 0.5         # mask threshold on the decoded [0, 1] map
    train_encoder: bool = False    # VTCT image encoder trained with the rest (False: frozen DINOv2)
    query_prior: str = "none"      # support latents also fed to the query branch: none [paper] | mask | image+mask
    prior_residual: bool = False   # predict a correction added to the support-mask latent (needs a query_prior)
    mask_loss_weight: float = 0.0  # weight of Dice + BCE on the decoded query mask (0: latent MSE only [paper])
    align_support: str = "none"    # support warped onto each query before the network: none [paper] | registration
    edit_prior: bool = False       # prior_residual: apply the network's changes to the full-resolution support mask
    prior_backbone: str = "none"   # pretrained 2D prior in VTCT, QE and conv_in: none [paper] | efficientnet-lite2 (lib.model.prior)
    prior_size: int = 256          # the prior backbone's input H = W (its features at prior_size / 8, resized to the latents)
    train_prior: bool = False      # the prior backbone fine-tuned (recipe lr_prior) and stored (False: frozen, the wheel's)
    sources: dict[str, Any] = field(default_factory=dict)  # where pretrained parts came from

    @property
    def latent_size(self) -> int:
        """H = W of the VAE latents (image_size / 2**(number of VAE down blocks - 1))."""
        return self.image_size // 2 ** (len(self.vae["block_out_channels"]) - 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SDFSMISConfig":
        """A config from `to_dict` output; legacy training keys are dropped, other unknown keys raise."""
        data = {k: v for k, v in data.items() if k not in LEGACY_TRAINING_KEYS}
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown SD-FSMIS config keys: {sorted(unknown)}")
        return cls(**data)
