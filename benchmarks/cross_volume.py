"""How well cross-volume episodes carry a region from one patient to another (lib.data.cross_volume).

    python -m benchmarks.cross_volume --data ../shared/data/abd-mri --volumes 1 2 3 5

For every ordered pair of the given volumes, volume A's ground-truth organs are carried onto volume
B the way training carries supervoxels (`box`: the same relative body position; `affine`: plus a 3D
affine registration) and compared with B's organs: mean Dice per organ and seconds per pair. Labels
are read for this measurement only; training never sees them. Prints a table and a JSON line.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import device_name, emit_json, load_average

ORGANS = {"abd-mri": {"liver": 1, "RK": 2, "LK": 3, "spleen": 4}, "abd-ct": {"liver": 6, "RK": 2, "LK": 3, "spleen": 1}}


def main(argv=None) -> None:
    from lib.data.cross_volume import CARRY_ALIGNMENTS, register_volumes
    from lib.data.supervoxel_cache import load_or_compute
    from lib.data.volumes import load_volume
    from lib.transforms.intensity import normalize_volume

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--volumes", nargs="+", required=True, help="image ids (image_K.nii.gz)")
    p.add_argument("--align", nargs="+", default=list(CARRY_ALIGNMENTS), choices=CARRY_ALIGNMENTS)
    args = p.parse_args(argv)
    organs = ORGANS["abd-ct" if "ct" in Path(args.data).name else "abd-mri"]
    vols = []
    for k in args.volumes:
        raw, spacing = load_volume(Path(args.data) / f"image_{k}.nii.gz")
        label = load_volume(Path(args.data) / f"label_{k}.nii.gz", dtype=np.int16)[0]
        vols.append((normalize_volume(raw), load_or_compute(raw, spacing).supervoxels, label))
    rows = {}
    for align in args.align:
        dice, t0, n = [], time.perf_counter(), 0
        for a, (img_a, sv_a, lab_a) in enumerate(vols):
            for b, (img_b, sv_b, lab_b) in enumerate(vols):
                if a == b:
                    continue
                carried = register_volumes(img_a, sv_a, img_b, sv_b, align, labels=lab_a)()
                dice.append([2 * ((carried == o) & (lab_b == o)).sum() / max((carried == o).sum() + (lab_b == o).sum(), 1)
                             for o in organs.values()])
                n += 1
        rows[align] = {"dice": dict(zip(organs, np.round(100 * np.mean(dice, 0), 1).tolist())),
                       "mean": round(100 * float(np.mean(dice)), 1), "s_per_pair": round((time.perf_counter() - t0) / n, 2)}
    print(f"device: {device_name(torch.device('cpu'))}, load {load_average()}, {len(vols)} volumes ({n} ordered pairs)")
    print("| align | " + " | ".join(organs) + " | mean | s / pair |")
    print("|---" * (len(organs) + 3) + "|")
    for align, r in rows.items():
        print(f"| {align} | " + " | ".join(f"{v:.1f}" for v in r["dice"].values()) + f" | {r['mean']:.1f} | {r['s_per_pair']} |")
    emit_json({"benchmark": "cross_volume", "data": Path(args.data).name, "volumes": args.volumes, "rows": rows})


if __name__ == "__main__":
    main()
