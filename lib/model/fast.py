"""Fast-inference settings for SDFSMIS.segment / predict (inference only; training is unaffected).

`model.segment` is already the fast path on CPU (support cache, batched query slices, inference
mode, PyTorch SDPA attention everywhere). `enable_fast` adds the device-specific options.
"""
from __future__ import annotations

import torch
from torch import nn


def enable_fast(model: nn.Module, dtype: torch.dtype | None = None, compile: bool = False,
                channels_last: bool = False, threads: int | None = None):
    """Configure `model` (an SDFSMIS) for fast inference; returns it.

    dtype: fp16 / bf16 autocast for encode_support / predict / segment on CUDA (ignored on CPU).
    compile: torch.compile the UNet and the VAE encoder/decoder (first call compiles: slow).
    channels_last: channels-last memory format for the UNet and VAE convolutions (measured: no
        gain on CPU, so off by default).
    threads: torch.set_num_threads(threads), process-wide. On a CPU shared with other jobs one
        thread is much faster than one per core (OpenMP threads wait for each other); see
        docs/benchmarks.md.
    """
    if threads:
        torch.set_num_threads(int(threads))
    model.autocast_dtype = dtype if model.device.type != "cpu" else None
    if channels_last:
        model.unet.to(memory_format=torch.channels_last)
        model.vae.to(memory_format=torch.channels_last)
    if compile and not getattr(model, "_compiled", False):
        model.unet.forward = torch.compile(model.unet.forward, dynamic=False)
        model.vae.encoder.forward = torch.compile(model.vae.encoder.forward, dynamic=False)
        model.vae.decoder.forward = torch.compile(model.vae.decoder.forward, dynamic=False)
        model._compiled = True
    return model
