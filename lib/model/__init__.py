"""SD-FSMIS network: Stable Diffusion adapted for few-shot medical image segmentation.

Imports torch, diffusers and transformers only (no monai / monailabel).
"""
from lib.model.cache import SupportCache
from lib.model.checkpoint import is_checkpoint, load_checkpoint, read_meta, save_checkpoint
from lib.model.config import SDFSMISConfig
from lib.model.factory import build_model
from lib.model.pretrained import PretrainedWeightsMissing
from lib.model.presets import PRESETS, preset_config
from lib.model.sdfsmis import SDFSMIS

__all__ = [
    "PRESETS", "PretrainedWeightsMissing", "SDFSMIS", "SDFSMISConfig", "SupportCache", "build_model",
    "is_checkpoint", "load_checkpoint", "preset_config", "read_meta", "save_checkpoint",
]
