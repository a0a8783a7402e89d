"""The training loop: set up (devices, DDP), data, optimiser, steps, logging, publishing.

`train(TrainOptions(...))` runs (or resumes) one run into `opts.out`; under `torchrun` each process
is one rank of a data-parallel (DDP) run and rank 0 writes the output.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from lib.data.volumes import DatasetError
from lib.model.config import SDFSMISConfig
from lib.model.sdfsmis import SDFSMIS
from lib.training.data import load_episodes
from lib.training.losses import loss_module
from lib.training.options import TrainOptions, parse_args
from lib.training.publish import Publisher, build_or_resume, load_state
from lib.training.recipe import RECIPE_FIELDS, Recipe, lr_factor, recipe_for


@dataclass
class TrainResult:
    model_dir: Path
    iterations_done: int
    final_loss: float
    stopped: bool
    elapsed: float


# ---- set-up -------------------------------------------------------------------------------------
def resolve_device(name: str = "auto") -> torch.device:
    """auto -> cuda when available else cpu; a CUDA request without a GPU raises."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but no CUDA GPU is available; use --device cpu")
    return dev


@dataclass
class Process:
    """This process's place in the run: its rank, device, and whether it is one of several (DDP)."""

    device: torch.device
    rank: int = 0
    distributed: bool = False


def setup(opts: TrainOptions) -> Process:
    """Join the torchrun process group when WORLD_SIZE > 1; pick the device and CPU threads."""
    device_name, rank, distributed = opts.device, 0, int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        import torch.distributed as dist

        backend = "nccl" if torch.cuda.is_available() and opts.device != "cpu" else "gloo"
        dist.init_process_group(backend)
        rank = dist.get_rank()
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            device_name = f"cuda:{torch.cuda.current_device()}"
    if opts.threads:
        torch.set_num_threads(opts.threads)
    return Process(resolve_device(device_name), rank, distributed)


def teardown(proc: Process) -> None:
    if proc.distributed:
        import torch.distributed as dist

        dist.destroy_process_group()


def configure_model(cfg: SDFSMISConfig, opts: TrainOptions) -> None:
    """Options that change the model's own config (and so its checkpoint): loss weight, alignment."""
    if opts.mask_loss_weight is not None:
        cfg.mask_loss_weight = float(opts.mask_loss_weight)
    if opts.align is not None:
        cfg.align_support = opts.align


def run_recipe(cfg: SDFSMISConfig, opts: TrainOptions) -> Recipe:
    """The model preset's recipe with this run's explicit options on top."""
    return recipe_for(cfg.preset).override(**{k: getattr(opts, k) for k in RECIPE_FIELDS})


# ---- optimiser and step -------------------------------------------------------------------------
def param_groups(model: SDFSMIS, stage: str, recipe: Recipe) -> list[dict]:
    """AdamW groups: the VAE alone ('vae' stage), else the UNet, the new layers and a fine-tuned prior."""
    if stage == "vae":
        if model.config.sources.get("sd"):
            raise ValueError("the sd15 VAE is pretrained: the 'vae' stage is for the mini and tiny presets")
        model.vae.requires_grad_(True)
        return [{"params": list(model.vae.parameters()), "lr": recipe.lr_vae, "name": "vae"}]
    groups = model.param_groups()
    out = [{"params": groups["unet"], "lr": recipe.lr_unet, "name": "unet"},
           {"params": groups["new"], "lr": recipe.lr_new, "name": "new"}]
    if groups["prior"]:
        out.append({"params": groups["prior"], "lr": recipe.lr_prior, "name": "prior"})
    return out


def make_optimizer(model: SDFSMIS, stage: str, recipe: Recipe) -> torch.optim.AdamW:
    """Put the model in training mode and build its AdamW (weight decay from the recipe)."""
    model.train()
    groups = param_groups(model, stage, recipe)
    if stage == "vae":
        model.vae.train()
    return torch.optim.AdamW(groups, weight_decay=recipe.weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, base_lrs: list[float], factor: float) -> None:
    """Every group's learning rate = its recipe rate x the schedule's factor."""
    for g, lr in zip(optimizer.param_groups, base_lrs):
        g["lr"] = lr * factor


def step(net: nn.Module, optimizer: torch.optim.Optimizer, batch: dict, grad_clip: float) -> float:
    """One optimisation step (backward, clipping, AdamW) -> the loss."""
    loss = net(batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return float(loss.detach())


# ---- logging ------------------------------------------------------------------------------------
class RunLog:
    """Smoothed loss, it/s, the tqdm bar, out/train_log.jsonl and the caller's progress callback."""

    def __init__(self, out: Path, opts: TrainOptions, iterations: int, start: int, writer: bool,
                 progress: Callable[[dict], None] | None = None):
        self.iterations, self.start, self.every, self.progress = iterations, start, opts.log_every, progress
        self.file = (out / "train_log.jsonl").open("a") if writer else None
        self.bar = tqdm(total=iterations, initial=start, desc=f"train {opts.stage}", unit="it",
                        disable=not opts.progress_bar or not writer)
        self.t0, self.ema, self.last = time.perf_counter(), None, float("nan")

    def say(self, text: str) -> None:
        if self.file is not None:
            self.bar.write(text)

    def record(self, it: int, loss: float, optimizer: torch.optim.Optimizer) -> None:
        self.last = loss
        self.ema = loss if self.ema is None else 0.95 * self.ema + 0.05 * loss
        elapsed = self.elapsed
        rate = (it - self.start) / max(elapsed, 1e-9)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{self.ema:.4f}", its=f"{rate:.2f}")
        info = {"iteration": it, "iterations": self.iterations, "loss": loss, "loss_ema": self.ema,
                "it_per_s": rate, "elapsed": elapsed}
        if self.file is not None and (it % self.every == 0 or it == self.iterations):
            self.file.write(json.dumps(dict(info, lr=[g["lr"] for g in optimizer.param_groups])) + "\n")
            self.file.flush()
        if self.progress is not None:
            self.progress(info)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    @property
    def final_loss(self) -> float:
        return float(self.ema if self.ema is not None else self.last)

    def close(self) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()


# ---- the run ------------------------------------------------------------------------------------
def train(opts: TrainOptions, progress: Callable[[dict], None] | None = None,
          should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Run (or resume) one training run into opts.out (lib.training.publish has the layout)."""
    opts.check()
    proc = setup(opts)
    try:
        return _run(opts, proc, progress, should_stop)
    finally:
        teardown(proc)


def _run(opts: TrainOptions, proc: Process, progress, should_stop) -> TrainResult:
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    model, start, resumed = build_or_resume(opts, out, proc.device)
    configure_model(model.config, opts)
    recipe = run_recipe(model.config, opts)
    torch.manual_seed(opts.seed + start + 1000 * proc.rank)
    episodes = load_episodes(opts, model.config, recipe.batch_size, proc.device, start, proc.rank)
    optimizer = make_optimizer(model, opts.stage, recipe)
    base_lrs = [g["lr"] for g in optimizer.param_groups]   # the recipe's, also after a resumed state
    restored = resumed and load_state(optimizer, out / "state", start)
    net = loss_module(model, opts.stage)
    if proc.distributed:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[proc.device.index] if proc.device.type == "cuda"
                                                  else None)
    publish = Publisher(model, optimizer, out, opts, recipe, len(episodes.images),
                        lambda: episodes.plain_batch(16), proc.rank)
    log = RunLog(out, opts, recipe.iterations, start, proc.rank == 0, progress)
    note = (f"; resumed at iteration {start}" + ("" if restored else " (fresh optimizer moments)")) if resumed else ""
    log.say(f"{model.config.preset} {opts.stage}: {len(episodes.images)} volumes, {len(episodes.sampler)} episode "
            f"candidates, batch {recipe.batch_size}, {recipe.iterations} iterations on {proc.device}{note}")
    it, stopped = start, False
    try:
        for it in range(start + 1, recipe.iterations + 1):
            set_lr(optimizer, base_lrs, lr_factor(it, recipe.iterations, recipe.warmup, recipe.schedule))
            loss = step(net, optimizer, episodes.batch(), recipe.grad_clip)
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at iteration {it}; lower the learning rates")
            log.record(it, loss, optimizer)
            stopped = bool(should_stop and should_stop()) or (opts.stop_at is not None and it >= opts.stop_at)
            if it % opts.checkpoint_every == 0 or it == recipe.iterations or stopped:
                publish(it, log.ema)
            if stopped:
                break
    finally:
        log.close()
    model.eval()
    if opts.stage == "vae":
        model.vae.requires_grad_(False).eval()
    return TrainResult(out / "model", it, log.final_loss, stopped, log.elapsed)


def main(argv=None) -> int:
    """`python -m lib.train`: parse, train, print one line; a bad input exits 2 with its message."""
    opts = parse_args(argv)
    try:
        res = train(opts)
    except (DatasetError, ValueError, RuntimeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    state = "stopped" if res.stopped else "done"
    print(f"{state}: {res.iterations_done} iterations, loss {res.final_loss:.4f}, {res.elapsed:.0f} s "
          f"-> {res.model_dir}")
    return 0
