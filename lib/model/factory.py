"""One factory for every preset: build_model("sd15" | "mini" | "tiny", ...)."""
from __future__ import annotations

import json
from pathlib import Path

from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import Dinov2Config, Dinov2Model

from lib.model.config import SDFSMISConfig
from lib.model.pretrained import DINO_ENV, DINO_HUB_ID, SD15_HUB_ID, SD_ENV, load_dinov2, load_sd15, weights_source
from lib.model.presets import preset_config
from lib.model.sdfsmis import SDFSMIS


def _random_parts(config: SDFSMISConfig):
    unet = UNet2DConditionModel.from_config(config.unet)
    vae = AutoencoderKL.from_config(config.vae)
    encoder = Dinov2Model(Dinov2Config(**config.dino))
    return unet, vae, encoder


def read_reference_configs(folder) -> dict:
    """Architectures from a folder laid out like SD v1.5 + dinov2-small/config.json (numbers only)."""
    folder = Path(folder)
    load = lambda p: {k: v for k, v in json.loads(p.read_text()).items() if not k.startswith("_")}  # noqa: E731
    unet = load(folder / "sd15" / "unet" / "config.json")
    vae = dict(load(folder / "sd15" / "vae" / "config.json"))
    vae.setdefault("scaling_factor", 0.18215)
    dino = {k: v for k, v in load(folder / "dinov2-small" / "config.json").items() if k != "model_type"}
    return {"unet": unet, "vae": vae, "dino": dino}


def build_model(
    preset: str = "mini",
    sd_path: str | None = None,
    dino_path: str | None = None,
    pretrained: bool | None = None,
    reference_dir: str | None = None,
    config: SDFSMISConfig | None = None,
    **overrides,
) -> SDFSMIS:
    """Build SD-FSMIS.

    preset: "sd15" (the paper), "mini" (CPU default), "tiny" (tests).
    pretrained: load SD v1.5 / DINOv2-small weights (default: True for sd15, which has them; the
        others have no pretrained weights). With pretrained=False the architecture gets random weights.
    reference_dir: take the sd15 architectures from a folder of config files (random weights).
    overrides: SDFSMISConfig fields to change (e.g. n_tokens=8, threshold=0.4).
    """
    config = config or preset_config(preset)
    if reference_dir is not None:
        for key, value in read_reference_configs(reference_dir).items():
            setattr(config, key, value)
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise ValueError(f"unknown SD-FSMIS option {key!r}")
        setattr(config, key, value)
    if pretrained is None:
        pretrained = config.preset == "sd15"
    unet, vae, encoder = None, None, None
    if pretrained:
        if config.preset != "sd15":
            raise ValueError(f"preset {config.preset!r} has no pretrained weights; use pretrained=False")
        unet, vae = load_sd15(sd_path)
        encoder = load_dinov2(dino_path)
        config.unet = {k: v for k, v in unet.config.items() if not k.startswith("_")}
        config.vae = {k: v for k, v in vae.config.items() if not k.startswith("_")}
        config.dino = {k: v for k, v in encoder.config.to_dict().items() if k in config.dino}
        config.sources = {
            "sd": weights_source(sd_path, SD_ENV) or SD15_HUB_ID,
            "dino": weights_source(dino_path, DINO_ENV) or DINO_HUB_ID,
        }
    else:
        unet, vae, encoder = _random_parts(config)
    return SDFSMIS(config, unet, vae, encoder)
