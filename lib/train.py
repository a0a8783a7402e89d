"""Self-supervised training of SD-FSMIS on supervoxel pseudo-labels (no ground truth).

`python -m lib.train DATA [DATA ...] --out runs/mini` trains the network on episodes drawn from the
images' supervoxels (DESIGN §3); `--stage vae` first trains a `mini`/`tiny` VAE to reconstruct slices
and masks (SD v1.5 has a pretrained one). The output folder holds:

    out/model/            the published checkpoint (save_checkpoint format, replaced atomically)
    out/state/            optimizer moments + iteration, for --resume (safetensors + JSON)
    out/train_log.jsonl   one JSON line per logged iteration (loss, it/s, lr)

Runs on CPU or CUDA; under `torchrun --nproc_per_node=G` it trains data-parallel (torch DDP).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from lib.data.episodes import SETTING2_RULES, EpisodeSampler
from lib.data.training_set import collect_images, load_training_volumes
from lib.data.volumes import DatasetError
from lib.model import PRESETS, build_model, load_checkpoint, read_meta, save_checkpoint
from lib.model.checkpoint import atomic_folder, recover_checkpoint
from lib.model.sdfsmis import SDFSMIS
from lib.transforms.align import ALIGNMENTS, SliceAligner, support_aligner
from lib.transforms.augment import EpisodeAugment, resize_episode

STAGES = ("sdfsmis", "vae")
SCHEDULES = ("constant", "cosine")
KL_WEIGHT = 1e-6  # VAE stage: KL term weight (as the SD autoencoders)


@dataclass
class TrainOptions:
    """Everything one training run needs; None = the preset's (or the init checkpoint's) value."""

    data: list = field(default_factory=list)   # dataset folders and/or image files (labels unused)
    out: str = "runs/train"                     # output folder (model/, state/, train_log.jsonl)
    preset: str = "mini"                        # architecture when `init` is None
    init: str | None = None                     # checkpoint folder to start from
    stage: str = "sdfsmis"                      # "sdfsmis" (the network) or "vae" (mini/tiny VAE first)
    iterations: int | None = None
    batch_size: int | None = None
    lr_unet: float | None = None
    lr_new: float | None = None
    lr_vae: float = 1e-3
    mask_loss_weight: float | None = None       # Dice + BCE on the decoded mask (None: the model config's)
    weight_decay: float | None = None
    grad_clip: float = 1.0
    warmup: int = 100                           # linear learning-rate warm-up, iterations
    stop_at: int | None = None                  # end (and publish) after this iteration; the schedule keeps `iterations`
    schedule: str = "constant"                  # after warm-up: constant [paper] | cosine (to 10% at the end)
    checkpoint_every: int = 500
    seed: int = 42
    device: str = "auto"                        # auto | cpu | cuda | cuda:N
    resume: bool = True                         # continue from out/ when it holds a checkpoint
    cache_dir: str | None = None                # pseudo-label cache (default ~/.cache/sdfsmis/pseudolabels)
    sd_path: str | None = None
    dino_path: str | None = None
    exclude_labels: list | None = None          # Setting 2: ground-truth ids whose slices are dropped
    setting2_rule: str = "strict"               # strict | rpt
    merge: int = 0                              # grow episode regions by up to N neighbour supervoxels
    vanish: float = 0.0                         # share of episodes where the region ends on the query slice
    gap: int = 1                                # largest support-query slice distance (1 = adjacent)
    aug_strength: float = 1.0                   # geometric augmentation ranges x this (1 = RPT)
    align: str | None = None                    # support alignment: none | registration (None: the model config's)
    log_every: int = 10
    threads: int | None = None                  # torch CPU threads (None = torch's default)
    progress_bar: bool = True


@dataclass
class TrainResult:
    model_dir: Path
    iterations_done: int
    final_loss: float
    stopped: bool
    elapsed: float


def resolve_device(name: str = "auto") -> torch.device:
    """auto -> cuda when available else cpu; a CUDA request without a GPU raises."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but no CUDA GPU is available; use --device cpu")
    return dev


# ---- resume state (optimizer moments, no pickles) -----------------------------------------------
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


# ---- batches ------------------------------------------------------------------------------------
def make_batch(sampler: EpisodeSampler, augment: EpisodeAugment | None, size: int, batch: int,
               device: torch.device, aligner: SliceAligner | None = None) -> dict[str, torch.Tensor]:
    """B episodes -> dict of (B, 1, S, S) float tensors on `device`. With `aligner` the support is
    registered onto the query first, as at inference, and augmented after (registration of a
    gamma-changed or warped pair misaligns more than it aligns)."""
    eps = []
    for _ in range(batch):
        ep = resize_episode(sampler.sample(), size)
        ep = aligner.align_episode(ep) if aligner is not None else ep
        eps.append(augment(ep) if augment is not None else ep)
    return {k: torch.from_numpy(np.stack([e[k] for e in eps])[:, None]).to(device)
            for k in ("support_image", "support_mask", "query_image", "query_mask")}


class EpisodeLoss(nn.Module):
    """forward(batch) -> SD-FSMIS MSE loss; a module so torch DDP can wrap it."""

    def __init__(self, model: SDFSMIS):
        super().__init__()
        self.model = model

    def forward(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.loss(b["support_image"], b["support_mask"], b["query_image"], b["query_mask"])


class VAELoss(nn.Module):
    """forward(batch) -> L1 reconstruction of all images and masks (pseudo-RGB in [-1, 1]) + KL."""

    def __init__(self, model: SDFSMIS):
        super().__init__()
        self.vae = model.vae

    def forward(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        x = torch.cat([b["support_image"], b["support_mask"], b["query_image"], b["query_mask"]])
        rgb = (x * 2 - 1).expand(-1, 3, -1, -1)
        posterior = self.vae.encode(rgb).latent_dist
        rec = self.vae.decode(posterior.sample()).sample
        return F.l1_loss(rec, rgb) + KL_WEIGHT * posterior.kl().mean()


@torch.no_grad()
def latent_scaling_factor(model: SDFSMIS, batch: dict[str, torch.Tensor]) -> float:
    """1 / std of the VAE latents of images and masks (the SD recipe for `scaling_factor`)."""
    x = torch.cat([batch["support_image"], batch["query_image"], batch["support_mask"], batch["query_mask"]])
    z = model.vae.encode((x * 2 - 1).expand(-1, 3, -1, -1)).latent_dist.mean
    return float(1.0 / z.std().clamp_min(1e-6))


def lr_factor(it: int, iterations: int, warmup: int, schedule: str = "constant") -> float:
    """Learning-rate multiplier at iteration `it` (1-based): linear warm-up over `warmup` iterations,
    then 1 (constant) or a cosine from 1 down to 0.1 at `iterations` (cosine)."""
    if warmup > 0 and it < warmup:
        return it / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, iterations - max(warmup, 0))
    done = min(1.0, max(0.0, (it - max(warmup, 0)) / span))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * done))


# ---- the loop -----------------------------------------------------------------------------------
def _build_or_resume(opts: TrainOptions, out: Path, device: torch.device):
    """-> (model, start iteration, resumed?)."""
    published = out / "model"
    if opts.resume and recover_checkpoint(published):
        meta = read_meta(published)
        extra = meta.get("extra", {})
        if extra.get("stage", "sdfsmis") != opts.stage:
            raise ValueError(f"{published} holds a {extra.get('stage')!r}-stage run; use another --out "
                             f"or --no-resume to start the {opts.stage!r} stage over")
        return load_checkpoint(published, device=device, sd_path=opts.sd_path, dino_path=opts.dino_path), \
            int(extra.get("iteration", 0)), True
    if opts.init:
        init = load_checkpoint(opts.init, device=device, sd_path=opts.sd_path, dino_path=opts.dino_path)
        if opts.stage == "sdfsmis" and read_meta(opts.init).get("extra", {}).get("stage") == "vae":
            return _with_vae(opts, init, device), 0, False
        return init, 0, False
    if opts.preset not in PRESETS:
        raise ValueError(f"unknown preset {opts.preset!r}: choose one of {', '.join(PRESETS)}")
    return build_model(opts.preset, sd_path=opts.sd_path, dino_path=opts.dino_path).to(device), 0, False


def _with_vae(opts: TrainOptions, trained: SDFSMIS, device: torch.device) -> SDFSMIS:
    """A fresh `opts.preset` network that takes only the VAE (and its scaling factor) of a VAE-stage run."""
    model = build_model(opts.preset, sd_path=opts.sd_path, dino_path=opts.dino_path).to(device)
    vae_cfg = dict(trained.config.vae)
    if {k: v for k, v in vae_cfg.items() if k != "scaling_factor"} != \
            {k: v for k, v in model.config.vae.items() if k != "scaling_factor"}:
        raise ValueError(f"the VAE of {opts.init} is not the {opts.preset!r} preset's VAE; pass the matching --preset")
    model.vae.load_state_dict(trained.vae.state_dict())
    model.vae.register_to_config(scaling_factor=vae_cfg["scaling_factor"])
    model.config.vae["scaling_factor"] = vae_cfg["scaling_factor"]
    return model


def _param_groups(model: SDFSMIS, opts: TrainOptions) -> list[dict]:
    cfg = model.config
    if opts.stage == "vae":
        if cfg.sources.get("sd"):
            raise ValueError("the sd15 VAE is pretrained: the 'vae' stage is for the mini and tiny presets")
        model.vae.requires_grad_(True)
        return [{"params": list(model.vae.parameters()), "lr": opts.lr_vae, "name": "vae"}]
    groups = model.param_groups()
    return [
        {"params": groups["unet"], "lr": opts.lr_unet or cfg.lr_unet, "name": "unet"},
        {"params": groups["new"], "lr": opts.lr_new or cfg.lr_new, "name": "new"},
    ]


def train(opts: TrainOptions, progress: Callable[[dict], None] | None = None,
          should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Run (or resume) one training run; see the module docstring for the output layout."""
    if opts.stage not in STAGES:
        raise ValueError(f"unknown stage {opts.stage!r}: choose one of {', '.join(STAGES)}")
    if opts.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {opts.schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if opts.setting2_rule not in SETTING2_RULES:
        raise ValueError(f"unknown Setting 2 rule {opts.setting2_rule!r}: choose one of {', '.join(SETTING2_RULES)}")
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank = 0
    if distributed:
        import torch.distributed as dist

        backend = "nccl" if torch.cuda.is_available() and opts.device != "cpu" else "gloo"
        dist.init_process_group(backend)
        rank = dist.get_rank()
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            opts.device = f"cuda:{torch.cuda.current_device()}"
    device = resolve_device(opts.device)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)

    model, start, resumed = _build_or_resume(opts, out, device)
    cfg = model.config
    if opts.mask_loss_weight is not None:
        if opts.mask_loss_weight < 0:
            raise ValueError("mask_loss_weight must be >= 0")
        cfg.mask_loss_weight = float(opts.mask_loss_weight)
    if opts.align is not None:
        if opts.align not in ALIGNMENTS:
            raise ValueError(f"unknown support alignment {opts.align!r}: choose one of {' | '.join(ALIGNMENTS)}")
        cfg.align_support = opts.align
    aligner = support_aligner(cfg.align_support) if opts.stage == "sdfsmis" else None
    iterations = int(opts.iterations or cfg.iterations)
    batch_size = int(opts.batch_size or cfg.batch_size)
    if iterations < 1 or batch_size < 1 or opts.checkpoint_every < 1:
        raise ValueError("iterations, batch_size and checkpoint_every must be >= 1")
    torch.manual_seed(opts.seed + start + 1000 * rank)

    images = collect_images(opts.data)
    volumes, labels = load_training_volumes(images, opts.cache_dir, with_labels=opts.exclude_labels is not None,
                                            progress=opts.progress_bar and rank == 0)
    sampler = EpisodeSampler(volumes, seed=opts.seed + start + 1000 * rank, labels=labels or None,
                             exclude_labels=opts.exclude_labels, setting2_rule=opts.setting2_rule,
                             merge=opts.merge, vanish=opts.vanish, gap=opts.gap)
    augment = EpisodeAugment(cfg.image_size, seed=opts.seed + 7 + start + 1000 * rank,
                             strength=opts.aug_strength)

    model.train()
    groups = _param_groups(model, opts)
    if opts.stage == "vae":
        model.vae.train()
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay if opts.weight_decay is None
                                  else opts.weight_decay)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    restored = resumed and load_state(optimizer, out / "state", start)
    net: nn.Module = VAELoss(model) if opts.stage == "vae" else EpisodeLoss(model)
    if distributed:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for g in groups for p in g["params"]]

    def publish(iteration: int, loss: float) -> None:
        if rank != 0:
            return
        if opts.stage == "vae":
            model.vae.eval()
            factor = latent_scaling_factor(model, make_batch(sampler, None, cfg.image_size, 16, device))
            model.vae.register_to_config(scaling_factor=factor)
            cfg.vae["scaling_factor"] = factor
            model.vae.train()
        extra = {"stage": opts.stage, "iteration": iteration, "loss": loss, "images": len(images),
                 "options": {k: v for k, v in asdict(opts).items() if k not in ("data",)}}
        save_checkpoint(model, out / "model", extra=extra)
        save_state(optimizer, out / "state", iteration)

    log = (out / "train_log.jsonl").open("a") if rank == 0 else None
    bar = tqdm(total=iterations, initial=start, desc=f"train {opts.stage}", unit="it",
               disable=not opts.progress_bar or rank != 0)
    if rank == 0:
        note = f"resumed at iteration {start}" + ("" if restored or not resumed else " (fresh optimizer moments)")
        bar.write(f"{cfg.preset} {opts.stage}: {len(images)} volumes, {len(sampler)} episode candidates, "
                  f"batch {batch_size}, {iterations} iterations on {device}" + (f"; {note}" if resumed else ""))
    t0, ema, loss_value, it, stopped = time.perf_counter(), None, float("nan"), start, False
    try:
        for it in range(start + 1, iterations + 1):
            factor = lr_factor(it, iterations, opts.warmup, opts.schedule)
            for g, lr in zip(optimizer.param_groups, base_lrs):
                g["lr"] = lr * factor
            batch = make_batch(sampler, augment, cfg.image_size, batch_size, device, aligner)
            loss = net(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if opts.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, opts.grad_clip)
            optimizer.step()
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"loss became {loss_value} at iteration {it}; lower the learning rates")
            ema = loss_value if ema is None else 0.95 * ema + 0.05 * loss_value
            elapsed = time.perf_counter() - t0
            rate = (it - start) / max(elapsed, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{ema:.4f}", its=f"{rate:.2f}")
            info = {"iteration": it, "iterations": iterations, "loss": loss_value, "loss_ema": ema,
                    "it_per_s": rate, "elapsed": elapsed}
            if log is not None and (it % opts.log_every == 0 or it == iterations):
                log.write(json.dumps(dict(info, lr=[g["lr"] for g in optimizer.param_groups])) + "\n")
                log.flush()
            if progress is not None:
                progress(info)
            stop = bool(should_stop and should_stop()) or (opts.stop_at is not None and it >= opts.stop_at)
            if it % opts.checkpoint_every == 0 or it == iterations or stop:
                publish(it, ema)
            if stop:
                stopped = True
                break
    finally:
        bar.close()
        if log is not None:
            log.close()
        if distributed:
            import torch.distributed as dist

            dist.destroy_process_group()
    model.eval()
    if opts.stage == "vae":
        model.vae.requires_grad_(False).eval()
    return TrainResult(out / "model", it, float(ema if ema is not None else loss_value), stopped,
                       time.perf_counter() - t0)


# ---- command line -------------------------------------------------------------------------------
def parse_args(argv=None) -> TrainOptions:
    ap = argparse.ArgumentParser(prog="python -m lib.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("data", nargs="+", help="dataset folders (image_K.nii.gz) and/or NIfTI images; labels unused")
    ap.add_argument("--out", required=True, help="output folder (model/, state/, train_log.jsonl)")
    ap.add_argument("--preset", default="mini", choices=list(PRESETS), help="architecture when --init is not given")
    ap.add_argument("--init", help="checkpoint folder to start from (e.g. a trained VAE stage or the app's model)")
    ap.add_argument("--stage", default="sdfsmis", choices=STAGES, help="'vae' trains a mini/tiny VAE first")
    ap.add_argument("--iterations", type=int, help="default: the preset's (sd15: 15000, mini: see presets)")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--lr-unet", type=float)
    ap.add_argument("--lr-new", type=float, help="MLP, conv_in, SII (and the trained VTCT encoder of mini)")
    ap.add_argument("--lr-vae", type=float, default=1e-3, help="--stage vae only")
    ap.add_argument("--weight-decay", type=float)
    ap.add_argument("--mask-loss-weight", type=float,
                    help="weight of Dice + BCE on the decoded query mask, added to the paper's latent MSE "
                         "(default: the model's config; mini 1.0, sd15 0 = the paper)")
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--stop-at", type=int, metavar="N",
                    help="stop after iteration N (published), with the learning-rate schedule still planned for --iterations")
    ap.add_argument("--schedule", default="constant", choices=SCHEDULES,
                    help="learning rate after warm-up: constant (the paper) or cosine down to 10%% at the last iteration")
    ap.add_argument("--checkpoint-every", type=int, default=500)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--resume", dest="resume", action="store_true", default=True,
                    help="continue from --out when it holds a checkpoint (default)")
    ap.add_argument("--no-resume", dest="resume", action="store_false", help="start over, replacing --out's model")
    ap.add_argument("--cache-dir", help="pseudo-label cache folder")
    ap.add_argument("--sd-path", help="sd15: local SD v1.5 diffusers folder")
    ap.add_argument("--dino-path", help="sd15: local DINOv2-small folder")
    ap.add_argument("--exclude-labels", help="Setting 2: comma-separated ground-truth ids whose slices are dropped")
    ap.add_argument("--setting2-rule", default="strict", choices=SETTING2_RULES)
    ap.add_argument("--merge", type=int, default=0,
                    help="grow each episode's supervoxel by up to N random neighbour supervoxels "
                         "(multi-scale regions; 0 = ADNet/RPT's single supervoxel)")
    ap.add_argument("--vanish", type=float, default=0.0,
                    help="share of episodes whose query slice is where the region ends (empty target); 0 = ADNet/RPT")
    ap.add_argument("--gap", type=int, default=1,
                    help="largest support-query slice distance of an episode, drawn uniformly from 1..N "
                         "while the supervoxel lasts; 1 = ADNet/RPT's adjacent slices")
    ap.add_argument("--aug-strength", type=float, default=1.0,
                    help="multiply the geometric augmentation ranges (rotation, shear, translation, scale); 1 = RPT")
    ap.add_argument("--align", choices=ALIGNMENTS,
                    help="register each episode's support onto its query before the network sees it, and record "
                         "it in the model's config so inference does the same (default: the --init model's; "
                         "mini recipe: registration; the paper: none)")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest on a busy 2-core machine)")
    a = ap.parse_args(argv)
    exclude = [int(x) for x in a.exclude_labels.split(",")] if a.exclude_labels else None
    return TrainOptions(
        data=a.data, out=a.out, preset=a.preset, init=a.init, stage=a.stage, iterations=a.iterations,
        batch_size=a.batch_size, lr_unet=a.lr_unet, lr_new=a.lr_new, lr_vae=a.lr_vae, mask_loss_weight=a.mask_loss_weight,
        weight_decay=a.weight_decay,
        grad_clip=a.grad_clip, warmup=a.warmup, schedule=a.schedule, stop_at=a.stop_at, checkpoint_every=a.checkpoint_every, seed=a.seed, device=a.device,
        resume=a.resume, cache_dir=a.cache_dir, sd_path=a.sd_path, dino_path=a.dino_path, exclude_labels=exclude,
        setting2_rule=a.setting2_rule, merge=a.merge, vanish=a.vanish, gap=a.gap, aug_strength=a.aug_strength, align=a.align, log_every=a.log_every, threads=a.threads,
    )


def main(argv=None) -> int:
    opts = parse_args(argv)
    try:
        res = train(opts)
    except (DatasetError, ValueError, RuntimeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    state = "stopped" if res.stopped else "done"
    print(f"{state}: {res.iterations_done} iterations, loss {res.final_loss:.4f}, {res.elapsed:.0f} s -> {res.model_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
