"""Inference speed: segment an N-slice volume from one support slice, naive loop vs the fast path.

    python -m benchmarks.infer_speed --preset mini tiny sd15 --reference ../shared/reference --device cpu

naive: the reference implementations' loop, model.forward per slice (support branch
       recomputed for every slice, batch 1, fp32).
fast:  the project's path, lib.pipeline.step.Step.shared (support encoded once, query slices batched,
       inference mode; on CUDA optionally fp16/bf16 autocast and torch.compile, lib.model.fast).
Prints one table row per path, the fast/naive ratio, the masks' Dice, and a JSON line per preset.
"""
from __future__ import annotations

import argparse
import os

import torch

from benchmarks.common import (
    apply_device_args,
    PRESETS, PeakMemory, Timer, build, device_name, dice, emit_json, load_average, phantom,
)

DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def naive_segment(model, query, s_img, s_mask) -> torch.Tensor:
    """Per-slice loop as in the reference code: `model(...)` per query slice, the support branch
    recomputed every time: query (N, S, S) -> probabilities (N, S, S)."""
    from lib.pipeline.step import resize_slices

    size = model.config.image_size
    q = torch.as_tensor(query)[:, None]
    si = resize_slices(torch.as_tensor(s_img)[:, None], size).to(model.device)
    sm = (resize_slices(torch.as_tensor(s_mask)[:, None], size) > 0.5).float().to(model.device)
    out = []
    with torch.inference_mode():
        for i in range(q.shape[0]):
            z = model(resize_slices(q[i:i + 1], size).to(model.device), si[None, :, 0], sm[None, :, 0])
            out.append(resize_slices(model.decode(z).float().cpu(), q.shape[-2:])[:, 0])
    return torch.cat(out)


def run_preset(args, preset: str, device: torch.device) -> dict:
    from lib.model.fast import enable_fast
    from lib.pipeline.step import Step

    torch.manual_seed(0)
    model = build(preset, args.reference, args.checkpoint).to(device).eval()
    model.config.edit_prior = False     # both paths score the network's own output (edits are post-processing)
    size = model.config.image_size
    images, masks = phantom(args.slices + 1, size=args.size, seed=0)
    mid = (args.slices + 1) // 2
    s_img, s_mask = images[mid:mid + 1], masks[mid:mid + 1]
    query = images[[i for i in range(args.slices + 1) if i != mid]]
    n = query.shape[0]

    # naive first, on the plain model (fp32, no fast-path settings)
    for _ in range(args.warmup):
        naive_segment(model, query[:1], s_img, s_mask)
    with PeakMemory(device) as mem_naive, Timer(device) as t_naive:
        p_naive = naive_segment(model, query, s_img, s_mask)

    enable_fast(model, dtype=DTYPES[args.dtype], compile=args.compile, channels_last=args.channels_last)
    step = Step(model, model.config.threshold, batch_size=args.batch_size)
    fast = lambda q: torch.from_numpy(step.shared(q, s_img[0], s_mask[0]))  # noqa: E731
    for _ in range(args.warmup):
        fast(query[: min(n, args.batch_size)])
    with PeakMemory(device) as mem_fast, Timer(device) as t_fast:
        p_fast = fast(query)

    thr = model.config.threshold
    m_naive, m_fast = p_naive > thr, p_fast > thr
    fg = float(m_naive.float().mean())
    median = float(p_naive.median())
    rec = {
        "preset": preset, "device": device.type, "device_name": device_name(device), "threads": torch.get_num_threads(),
        "load_average": load_average(), "slices": n, "size": list(query.shape[-2:]), "batch_size": args.batch_size,
        "dtype": args.dtype, "compile": args.compile, "channels_last": args.channels_last,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""), "image_size": size,
        "naive_s": t_naive.seconds, "fast_s": t_fast.seconds,
        "naive_cpu_s": t_naive.cpu_seconds, "fast_cpu_s": t_fast.cpu_seconds,
        "naive_slices_per_s": n / t_naive.seconds, "fast_slices_per_s": n / t_fast.seconds,
        "speedup": t_naive.seconds / t_fast.seconds,
        "naive_peak_mib": mem_naive.mib, "fast_peak_mib": mem_fast.mib, "peak_reset": mem_naive.reset_ok,
        "dice": dice(m_naive, m_fast), "threshold": thr, "naive_foreground": fg,
        "one_class": fg in (0.0, 1.0) and bool((m_naive == m_fast).all()),
        "dice_at_median": dice(p_naive > median, p_fast > median), "median": median,
        "max_abs_prob_diff": float((p_naive - p_fast).abs().max()),
    }
    report(rec)
    return rec


def report(r: dict) -> None:
    mem = "RSS" if r["device"] == "cpu" else "cuda max allocated"
    print(f"preset={r['preset']} device={r['device_name']} load={r['load_average']} slices={r['slices']} "
          f"size={r['size'][0]}x{r['size'][1]} batch={r['batch_size']} dtype={r['dtype']} "
          f"input={r['image_size']} compile={r['compile']} channels_last={r['channels_last']} "
          f"threads={r['threads']} OMP_WAIT_POLICY={r['omp_wait_policy'] or '-'}")
    for name in ("naive", "fast"):
        s = r[f"{name}_s"]
        print(f"  {name:5s} {s:8.2f} s  {r['slices'] / s:7.2f} slices/s  {1000 * s / r['slices']:8.1f} ms/slice  "
              f"cpu {r[f'{name}_cpu_s']:6.2f} s  peak {mem} {r[f'{name}_peak_mib']:.0f} MiB")
    note = " (all one class at this threshold: see dice@median)" if r["one_class"] else ""
    print(f"  fast/naive {r['speedup']:.2f}x  dice@{r['threshold']} {r['dice']:.4f}{note}  "
          f"naive foreground {100 * r['naive_foreground']:.1f}%  dice@median({r['median']:.4f}) "
          f"{r['dice_at_median']:.4f}  max|p_fast-p_naive| {r['max_abs_prob_diff']:.2e}")


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="+", default=["mini"], choices=PRESETS)
    p.add_argument("--reference", default="../shared/reference",
                   help="folder with the sd15/ and dinov2-small/ config files (sd15 random weights)")
    p.add_argument("--checkpoint", default=None, help="a trained checkpoint folder instead of random weights")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--slices", type=int, default=36, help="query slices in the volume [36]")
    p.add_argument("--size", type=int, default=256, help="slice H = W of the volume [256]; resized to the preset's input size")
    p.add_argument("--batch-size", type=int, default=8, help="query slices per fast-path batch [8]")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs of each path [1]")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads [torch's default]")
    p.add_argument("--compile", action="store_true", help="torch.compile the fast path's UNet and VAE")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format in the fast path")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="fast-path autocast dtype (CUDA only)")
    args = p.parse_args(argv)
    device = apply_device_args(args)
    records = [run_preset(args, preset, device) for preset in args.preset]
    for rec in records:
        emit_json(rec)
    return records


if __name__ == "__main__":
    main()
