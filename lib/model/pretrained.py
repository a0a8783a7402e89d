"""Loading pretrained SD v1.5 (UNet, VAE) and DINOv2-small from a local folder or the model hub.

Never hangs on the network: a local folder or the hub cache is used first; a download is tried
only when the hub answers within a few seconds and HF_HUB_OFFLINE is not set.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

SD15_HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DINO_HUB_ID = "facebook/dinov2-small"
SD_ENV = "SDFSMIS_SD_PATH"
DINO_ENV = "SDFSMIS_DINO_PATH"


class PretrainedWeightsMissing(RuntimeError):
    """Pretrained weights are neither in a local folder nor reachable on the hub."""


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    try:
        from huggingface_hub import constants

        url = urlparse(constants.ENDPOINT)
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _how_to(what: str, hub_id: str, conf_key: str, env: str, layout: str) -> str:
    return (
        f"{what} weights not found. Set `{conf_key}` (app: --conf {conf_key} /path/to/folder; "
        f"CLI: --{conf_key.replace('_', '-')}; or the {env} environment variable) to a local folder "
        f"{layout}. To obtain it, on a machine with internet run:\n"
        f"    huggingface-cli download {hub_id} --local-dir <folder>\n"
        f"and copy <folder> here. Without these weights use the embedded model "
        f"(--conf preset mini), which needs no download."
    )


def _load(cls, source: str | None, hub_id: str, how_to: str, **kwargs):
    """cls.from_pretrained from `source` (folder or hub id), else the hub cache, else a bounded download."""
    tried = []
    if source:
        if Path(source).exists():
            return cls.from_pretrained(source, **kwargs)
        if "/" not in source or source.startswith((".", "/", "~")):
            raise PretrainedWeightsMissing(f"folder {source!r} does not exist.\n" + how_to)
        hub_id = source
    try:
        return cls.from_pretrained(hub_id, local_files_only=True, **kwargs)
    except Exception as err:  # noqa: BLE001 - any cache miss falls through to the download
        tried.append(f"hub cache: {type(err).__name__}")
    if _hub_reachable():
        return cls.from_pretrained(hub_id, **kwargs)
    tried.append("hub: not reachable (offline)")
    raise PretrainedWeightsMissing(how_to + f"\n(tried: {'; '.join(tried)})")


def weights_source(explicit: str | None, env: str) -> str | None:
    """The folder to load pretrained weights from: the one given, else the environment variable `env`
    (SD_ENV / DINO_ENV), else None (the Hugging Face cache or hub). The one reader of those variables."""
    return explicit or os.environ.get(env) or None


def load_sd15(sd_path: str | None = None):
    """-> (UNet2DConditionModel, AutoencoderKL) of SD v1.5 from `sd_path`, $SDFSMIS_SD_PATH or the hub."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    source = weights_source(sd_path, SD_ENV)
    how_to = _how_to("Stable Diffusion v1.5", SD15_HUB_ID, "sd_path", SD_ENV,
                     "in diffusers layout (with unet/ and vae/ subfolders)")
    unet = _load(UNet2DConditionModel, source, SD15_HUB_ID, how_to, subfolder="unet")
    vae = _load(AutoencoderKL, source, SD15_HUB_ID, how_to, subfolder="vae")
    return unet, vae


def load_dinov2(dino_path: str | None = None):
    """-> transformers Dinov2Model (DINOv2-small) from `dino_path`, $SDFSMIS_DINO_PATH or the hub."""
    from transformers import Dinov2Model

    source = weights_source(dino_path, DINO_ENV)
    how_to = _how_to("DINOv2-small", DINO_HUB_ID, "dino_path", DINO_ENV, "with config.json and model.safetensors")
    return _load(Dinov2Model, source, DINO_HUB_ID, how_to)
