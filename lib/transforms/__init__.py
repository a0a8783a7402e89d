"""MONAI-style transforms: volume intensity scaling, slice preparation, episode augmentation."""
from lib.transforms.intensity import normalize_volume

__all__ = ["normalize_volume"]
