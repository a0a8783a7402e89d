"""A run's output folder: the published checkpoint (atomic), optimizer state, and resuming from them.

    out/model/   save_checkpoint format, replaced atomically (`extra`: stage, iteration, loss, options, recipe)
    out/state/   optimizer moments + iteration (safetensors + JSON, no pickles)
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from lib.model import PRESETS, build_model, load_checkpoint, read_meta, save_checkpoint
from lib.model.checkpoint import atomic_folder, recover_checkpoint
from lib.model.sdfsmis import SDFSMIS
from lib.training.losses import latent_scaling_factor
from lib.training.options import TrainOptions
from lib.training.recipe import Recipe


def save_state(optimizer: torch.optim.Optimizer, folder: Path, iteration: int) -> None:
    """Optimizer state -> folder/optimizer.safetensors + folder/state.json, replaced atomically."""
    sd = optimizer.state_dict()
    tensors = {f"{i}.{k}": v.detach().cpu().contiguous() for i, s in sd["state"].items() for k, v in s.items()
               if torch.is_tensor(v)}
    meta = {"iteration": iteration, "param_groups": sd["param_groups"]}
    with atomic_folder(folder) as tmp:
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta))


def load_state(optimizer: torch.optim.Optimizer, folder: Path, iteration: int) -> bool:
    """Restore optimizer moments saved at `iteration`; False (fresh moments) when absent or stale."""
    try:
        meta = json.loads((folder / "state.json").read_text())
        tensors = load_file(str(folder / "optimizer.safetensors"))
    except (OSError, ValueError):
        return False
    if meta.get("iteration") != iteration:
        return False
    state: dict = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    try:
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (ValueError, KeyError):
        return False
    return True


def build_or_resume(opts: TrainOptions, out: Path, device: torch.device) -> tuple[SDFSMIS, int, bool]:
    """-> (model, start iteration, resumed?): out/model when resuming, else --init, else the preset."""
    published = out / "model"
    if opts.resume and recover_checkpoint(published):
        extra = read_meta(published).get("extra", {})
        if extra.get("stage", "sdfsmis") != opts.stage:
            raise ValueError(f"{published} holds a {extra.get('stage')!r}-stage run; use another --out "
                             f"or --no-resume to start the {opts.stage!r} stage over")
        model = load_checkpoint(published, device=device, sd_path=opts.sd_path, dino_path=opts.dino_path)
        return model, int(extra.get("iteration", 0)), True
    if opts.init:
        init = load_checkpoint(opts.init, device=device, sd_path=opts.sd_path, dino_path=opts.dino_path)
        if opts.stage == "sdfsmis" and read_meta(opts.init).get("extra", {}).get("stage") == "vae":
            return with_vae(opts, init, device), 0, False
        if opts.preset and opts.preset != init.config.preset:
            return warm_start(opts, init, device), 0, False
        return init, 0, False
    preset = opts.preset or "mini"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    return build_model(preset, sd_path=opts.sd_path, dino_path=opts.dino_path).to(device), 0, False


def warm_start(opts: TrainOptions, trained: SDFSMIS, device: torch.device) -> SDFSMIS:
    """A fresh `opts.preset` network that takes every tensor of `trained` with its name and shape, and
    the first input channels of a widened conv (conv_in_* of a preset with more inputs; the rest stay as
    built: zero for lib.model.prior's). The VAE's scaling factor comes along."""
    model = build_model(opts.preset, sd_path=opts.sd_path, dino_path=opts.dino_path).to(device)
    own, source, taken = model.state_dict(), trained.state_dict(), {}
    for key, value in source.items():
        ref = own.get(key)
        if ref is None or ref.ndim != value.ndim:
            continue
        if ref.shape == value.shape:
            taken[key] = value
        elif ref.ndim == 4 and ref.shape[0] == value.shape[0] and ref.shape[2:] == value.shape[2:] \
                and ref.shape[1] > value.shape[1]:
            taken[key] = torch.cat([value, ref[:, value.shape[1]:]], dim=1)
    if len(taken) < len(source) // 2:
        raise ValueError(f"{opts.init} shares too little with the {opts.preset!r} preset to start it")
    model.load_state_dict(taken, strict=False)
    factor = trained.config.vae["scaling_factor"]
    model.vae.register_to_config(scaling_factor=factor)
    model.config.vae["scaling_factor"] = factor
    return model


def with_vae(opts: TrainOptions, trained: SDFSMIS, device: torch.device) -> SDFSMIS:
    """A fresh `opts.preset` network that takes only the VAE (and its scaling factor) of a VAE-stage run."""
    model = build_model(opts.preset or "mini", sd_path=opts.sd_path, dino_path=opts.dino_path).to(device)
    vae_cfg = dict(trained.config.vae)
    if {k: v for k, v in vae_cfg.items() if k != "scaling_factor"} != \
            {k: v for k, v in model.config.vae.items() if k != "scaling_factor"}:
        raise ValueError(f"the VAE of {opts.init} is not the {opts.preset or 'mini'!r} preset's VAE; pass the matching --preset")
    model.vae.load_state_dict(trained.vae.state_dict())
    model.vae.register_to_config(scaling_factor=vae_cfg["scaling_factor"])
    model.config.vae["scaling_factor"] = vae_cfg["scaling_factor"]
    return model


class Publisher:
    """publish(iteration, loss): checkpoint + optimizer state into `out` (rank 0 only). A VAE-stage
    run first measures the latent scaling factor on `stats_batch()`."""

    def __init__(self, model: SDFSMIS, optimizer: torch.optim.Optimizer, out: Path, opts: TrainOptions,
                 recipe: Recipe, images: int, stats_batch: Callable[[], dict], rank: int = 0):
        self.model, self.optimizer, self.out, self.opts = model, optimizer, out, opts
        self.recipe, self.images, self.stats_batch, self.rank = recipe, images, stats_batch, rank

    def __call__(self, iteration: int, loss: float) -> None:
        if self.rank != 0:
            return
        model, cfg = self.model, self.model.config
        if self.opts.stage == "vae":
            model.vae.eval()
            factor = latent_scaling_factor(model, self.stats_batch())
            model.vae.register_to_config(scaling_factor=factor)
            cfg.vae["scaling_factor"] = factor
            model.vae.train()
        extra = {"stage": self.opts.stage, "iteration": iteration, "loss": loss, "images": self.images,
                 "options": {k: v for k, v in asdict(self.opts).items() if k != "data"},
                 "recipe": self.recipe.to_dict()}
        save_checkpoint(model, self.out / "model", extra=extra)
        save_state(self.optimizer, self.out / "state", iteration)
