"""Simulated annotator: does the slice the app suggests help more than evenly spaced slices?

    python -m lib.evaluation.active --data ../shared/data/abd-mri --checkpoint apps/sdfsmis/model --out runs/active-mri [--volumes 1 7 9]

On each volume (lib.evaluation.annotator: cut to the organs' slices, all organs in one request, each
scored over its extent) the annotation starts from the middle slice of every organ, then grows to
`--max-slices` slices per organ by three policies:
- suggested: the truth of a slice the app names (`next_slices` of the result, lib.pipeline.confidence: up
  to 3, best first), as annotator.draw_suggested answers them: a suggested slice without the organ (a walk
  ran on past its end) is a miss, and the annotator draws the organ's last slice between it and the
  annotation instead (or, that one annotated already, looks at the next suggestion);
- even:      k slices at the centres of k equal parts of the organ's extent (k = 1: the middle slice);
- hindsight: the slice with the most wrong voxels of the last result (an annotator who sees every error).
Writes results.json, results.md (Dice after 1, 2, 3, 5 slices; slices needed for 90 and 95 mean Dice)
and dice_vs_slices.png into --out.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from lib.evaluation.annotator import draw_suggested, load_case, middle_slice, organ_dice, segment, slice_errors
from lib.pipeline.options import WALKERS, PropagateOptions

POLICIES = ("suggested", "even", "hindsight")
REPORTED = (1, 2, 3, 5)


def even_slices(extent: tuple[int, int], k: int) -> list[int]:
    """k slices at the centres of k equal parts of (first, last)."""
    lo, hi = extent
    n = hi - lo + 1
    return sorted({lo + min(n - 1, int((i + 0.5) * n / k)) for i in range(k)})


def run_volume(model, options, case, max_slices: int, policies=POLICIES) -> dict:
    """-> {policy: {"dice": [[organ dice per k] ...], "misses": n, "chosen": {organ: slices}, "seconds": s}}."""
    organs = list(case.organs.values())
    start = {lid: [middle_slice(case, lid)] for lid in organs}
    out = {}
    first = None
    for policy in policies:
        t0 = time.perf_counter()
        cache: dict = {}
        chosen = {lid: list(zs) for lid, zs in start.items()}
        result = first if first is not None else segment(model, options, case, chosen, cache)
        first = result
        dice, misses = [[organ_dice(case, result.label, lid) for lid in organs]], 0
        for k in range(2, max_slices + 1):
            for lid in organs:
                if policy == "even":
                    chosen[lid] = even_slices(case.extent[lid], k)
                    continue
                if policy == "suggested":
                    ranked = result.next_slices.get(lid, [])
                else:
                    err = slice_errors(case, result.label, lid)
                    err[chosen[lid]] = -1
                    ranked = [int(np.argmax(err))] if err.max() > 0 else []
                z, missed = draw_suggested(case, lid, ranked, chosen[lid])
                misses += missed
                if z is not None:
                    chosen[lid] = sorted(chosen[lid] + [z])
            result = segment(model, options, case, chosen, None if policy == "even" else cache)
            dice.append([organ_dice(case, result.label, lid) for lid in organs])
        out[policy] = {"dice": dice, "misses": misses, "seconds": round(time.perf_counter() - t0, 1),
                       "chosen": {str(lid): [z + case.offset for z in zs] for lid, zs in chosen.items()}}
    return out


def summarize(per_volume: list[dict], max_slices: int) -> dict:
    """Mean Dice (%) over volumes and organs per policy and slice count; slices needed for 90 / 95."""
    table = {}
    for policy in per_volume[0]["policies"]:
        dice = np.array([v["policies"][policy]["dice"] for v in per_volume], dtype=float)   # (V, K, organs)
        mean = [round(100 * float(np.mean(dice[:, k])), 2) for k in range(max_slices)]
        need = {str(t): next((k + 1 for k, d in enumerate(mean) if d >= t), None) for t in (90, 95)}
        table[policy] = {"mean_dice": mean, "slices_needed": need,
                         "misses": int(sum(v["policies"][policy]["misses"] for v in per_volume))}
    return table


def write_report(out: Path, meta: dict, table: dict, max_slices: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({**meta, "summary": table}, indent=1))
    ks = [k for k in REPORTED if k <= max_slices]
    lines = [f"# Simulated annotator: {meta['dataset']}", "",
             f"Volumes {meta['volume_ids']} (indices {meta['volume_indices']} in id order; {meta['n_volumes']} of {meta['available']}), organs {meta['organs']}; "
             f"checkpoint {meta['checkpoint']}; {meta['minutes']} min.", "",
             "Mean Dice (%) over volumes and organs, by annotated slices per organ:", "",
             "| policy | " + " | ".join(f"{k} slice{'s' * (k > 1)}" for k in ks) + " | slices for 90 | for 95 | misses |",
             "|---|" + "---|" * (len(ks) + 3)]
    for policy, row in table.items():
        need = row["slices_needed"]
        lines.append(f"| {policy} | " + " | ".join(f"{row['mean_dice'][k - 1]:.2f}" for k in ks)
                     + f" | {need['90'] or f'>{max_slices}'} | {need['95'] or f'>{max_slices}'} | {row['misses']} |")
    lines += ["", "misses: suggested slices that did not show the organ (the annotator drew the organ's end instead, "
              "or took the next suggestion).", "",
              f"Command: `{meta['command']}`", ""]
    (out / "results.md").write_text("\n".join(lines))
    _plot(out / "dice_vs_slices.png", table, max_slices, meta["dataset"])


def _plot(path: Path, table: dict, max_slices: int, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for policy, row in table.items():
        ax.plot(range(1, max_slices + 1), row["mean_dice"], marker="o", label=policy)
    ax.set_xlabel("annotated slices per organ")
    ax.set_ylabel("mean Dice (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lib.evaluation.active", description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="dataset folder (image_K / label_K)")
    ap.add_argument("--checkpoint", default="apps/sdfsmis/model")
    ap.add_argument("--out", required=True)
    ap.add_argument("--volumes", type=int, nargs="*", help="volume indices in id order (default: all)")
    ap.add_argument("--max-slices", type=int, default=5)
    ap.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--walker", choices=WALKERS, default=PropagateOptions.walker, help="the app's `walker` [%(default)s]")
    args = ap.parse_args(argv)
    import sys

    import torch

    from lib.evaluation.dataset import EvalDataset
    from lib.evaluation.protocol import DEFAULT_ORGANS
    from lib.model import load_checkpoint

    torch.set_num_threads(args.threads)
    name = "abd-ct" if "ct" in Path(args.data).name else "abd-mri"
    ds = EvalDataset(args.data, DEFAULT_ORGANS[name])
    model = load_checkpoint(args.checkpoint)
    options = PropagateOptions.for_model(model, largest=True, walker=args.walker)   # the app's defaults
    volumes = args.volumes if args.volumes else list(range(len(ds)))
    t0, per_volume = time.perf_counter(), []
    for v in volumes:
        case = load_case(ds, v)
        res = run_volume(model, options, case, args.max_slices, args.policies)
        per_volume.append({"case": case.case_id, "organs": case.organs, "policies": res})
        print(f"volume {case.case_id}: " + "; ".join(
            f"{p} {[round(100 * float(np.mean(d)), 1) for d in r['dice']]} ({r['seconds']} s)" for p, r in res.items()),
            flush=True)
        meta = {"dataset": name, "checkpoint": args.checkpoint, "walker": args.walker, "volume_ids": [p["case"] for p in per_volume],
                "volume_indices": volumes[:len(per_volume)],
                "n_volumes": len(per_volume), "available": len(ds), "organs": DEFAULT_ORGANS[name],
                "minutes": round((time.perf_counter() - t0) / 60, 1), "command": " ".join(["python -m lib.evaluation.active", *sys.argv[1:]]),
                "per_volume": per_volume}
        write_report(Path(args.out), meta, summarize(per_volume, args.max_slices), args.max_slices)
    print((Path(args.out) / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
