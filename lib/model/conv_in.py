"""The two widened input convolutions (support [z_s^I, z_s^M], query [z_q, p_q]), Marigold-style."""
from __future__ import annotations

import torch
from torch import nn


def widen_conv_in(conv: nn.Conv2d, factor: int = 2) -> nn.Conv2d:
    """(C_in -> C) conv -> (factor*C_in -> C) conv whose weights are the original's repeated along the
    input channels and divided by `factor`, bias copied: feeding the same latent `factor` times
    reproduces the original conv exactly."""
    new = nn.Conv2d(
        conv.in_channels * factor,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        bias=conv.bias is not None,
    )
    with torch.no_grad():
        new.weight.copy_(conv.weight.repeat(1, factor, 1, 1) / factor)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new.to(device=conv.weight.device, dtype=conv.weight.dtype)
