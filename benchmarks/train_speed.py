"""Training speed: iterations/s and peak memory of SD-FSMIS training steps on synthetic episodes.

    python -m benchmarks.train_speed --preset mini sd15 --reference ../shared/reference --device cpu

One iteration is the step of lib/training/loop.py: model.loss on a batch of 1-shot episodes (support
branch, query branch, MSE to the query-mask latent), backward, gradient clipping at 1.0, AdamW with
the two learning-rate groups of the preset's recipe (lib.training.recipe). sd15 uses random weights
in the SD v1.5 / DINOv2-small architectures with the VAE and DINOv2 frozen, as in the paper. Episode
sampling and augmentation (data loading) are not timed.
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.common import PRESETS, PeakMemory, apply_device_args, Timer, build, device_name, emit_json, load_average, phantom
from lib.training.recipe import recipe_for


def episodes(batch: int, size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch of 1-shot episodes from the phantom: (B, 1, S, S) tensors."""
    img, mask = phantom(batch + 1, size=size, seed=seed)
    t = lambda a: torch.from_numpy(a)[:, None]  # noqa: E731
    return {"support_image": t(img[1:]), "support_mask": t(mask[1:]),
            "query_image": t(img[:-1]), "query_mask": t(mask[:-1])}


def run_preset(args, preset: str, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = build(preset, args.reference).to(device).train()
    cfg, recipe = model.config, recipe_for(preset)
    batch_size = args.batch_size or recipe.batch_size
    groups = model.param_groups()
    optimizer = torch.optim.AdamW(
        [{"params": groups["unet"], "lr": recipe.lr_unet}, {"params": groups["new"], "lr": recipe.lr_new}],
        weight_decay=recipe.weight_decay,
    )
    params = [p for g in optimizer.param_groups for p in g["params"]]
    trainable = sum(p.numel() for p in params)
    frozen = sum(p.numel() for p in model.parameters()) - trainable
    batch = {k: v.to(device) for k, v in episodes(batch_size, cfg.image_size).items()}

    def step() -> float:
        with torch.autocast(device.type, dtype=DTYPES[args.dtype], enabled=args.dtype != "fp32"):
            loss = model.loss(batch["support_image"], batch["support_mask"], batch["query_image"], batch["query_mask"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return float(loss.detach())

    for _ in range(args.warmup):
        step()
    with PeakMemory(device) as mem, Timer(device) as timer:
        losses = [step() for _ in range(args.iterations)]
    rec = {
        "preset": preset, "device": device.type, "device_name": device_name(device), "threads": torch.get_num_threads(),
        "load_average": load_average(), "batch_size": batch_size, "image_size": cfg.image_size, "dtype": args.dtype,
        "iterations": args.iterations, "warmup": args.warmup, "seconds": timer.seconds,
        "cpu_seconds": timer.cpu_seconds,
        "it_per_s": args.iterations / timer.seconds, "episodes_per_s": args.iterations * batch_size / timer.seconds,
        "peak_mib": mem.mib, "peak_reset": mem.reset_ok, "trainable_params": trainable, "frozen_params": frozen,
        "last_loss": losses[-1],
    }
    mem_name = "RSS" if device.type == "cpu" else "cuda max allocated"
    print(f"preset={preset} device={rec['device_name']} load={rec['load_average']} batch={batch_size} "
          f"size={cfg.image_size} dtype={args.dtype} trainable={trainable / 1e6:.1f}M frozen={frozen / 1e6:.1f}M")
    print(f"  train {args.iterations} it in {timer.seconds:.2f} s  {rec['it_per_s']:.3f} it/s  "
          f"{1000 * timer.seconds / args.iterations:.0f} ms/it  cpu {timer.cpu_seconds:.1f} s  peak {mem_name} {mem.mib:.0f} MiB  "
          f"(after {args.warmup} warm-up it; loss {losses[-1]:.4f})")
    return rec


DTYPES = {"fp32": None, "bf16": torch.bfloat16}  # fp16 training would need a GradScaler


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="+", default=["mini"], choices=PRESETS)
    p.add_argument("--reference", default="../shared/reference",
                   help="folder with the sd15/ and dinov2-small/ config files (sd15 random weights)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=0, help="episodes per iteration [the preset's]")
    p.add_argument("--iterations", type=int, default=10, help="timed iterations [10]")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up iterations [2]")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads [torch's default]")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="autocast dtype (CUDA only) [fp32]")
    args = p.parse_args(argv)
    device = apply_device_args(args)
    if args.iterations < 1 or args.warmup < 0:
        raise SystemExit("--iterations must be >= 1 and --warmup >= 0")
    records = [run_preset(args, preset, device) for preset in args.preset]
    for rec in records:
        emit_json(rec)
    return records


if __name__ == "__main__":
    main()
