"""Across volumes in process: the seeded chain (`appearance 0`) against every slice fused with
pretrained appearance, from the support as it is and located first (the app's default), time and Dice.

    python -m benchmarks.cross_volume_speed --data ../shared/data/abd-ct --query 14 --support 16

Both volumes are cropped to --slices slices around their liver and spleen (benchmarks.served_speed's
case); the support's two organs are annotated on one slice and segmented in the query with the app's
defaults. Prints the device, the load average, wall and CPU seconds (best of --repeats) and per-organ
3D Dice. Not a test: nothing is asserted.
"""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import device_name, emit_json, load_average
from benchmarks.served_speed import APP, ct_case, dice


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="the abd-ct folder (image_K / label_K)")
    p.add_argument("--query", type=int, default=14, help="query volume K [14]")
    p.add_argument("--support", type=int, default=16, help="support volume K [16]")
    p.add_argument("--slices", type=int, default=36, help="slices per cropped volume [36]")
    p.add_argument("--repeats", type=int, default=2, help="runs of each setting [2]")
    p.add_argument("--threads", type=int, default=1, help="torch threads [1]")
    args = p.parse_args(argv)
    from lib.model import load_checkpoint
    from lib.pipeline import PropagateOptions, propagate

    torch.set_num_threads(args.threads)
    image, _, truth, _, _, organs = ct_case(args.data, args.query, args.slices)
    s_image, s_ann, _, _, _, _ = ct_case(args.data, args.support, args.slices)
    model = load_checkpoint(APP / "model").eval()
    rec = {"device_name": device_name(torch.device("cpu")), "load_average": load_average(), "runs": {}}
    default = PropagateOptions.appearance   # the app's
    for name, weight, locate in (("seeded chain (appearance 0)", 0.0, True),
                                 ("every slice fused, not located", default, False),
                                 (f"located, every slice fused (appearance {default:g})", default, True)):
        options = PropagateOptions.for_model(model, appearance=weight, locate=locate)
        best = None
        for _ in range(args.repeats):
            t, c = time.perf_counter(), time.process_time()
            label = propagate(model, image, s_ann, options, support_image=s_image).label
            run = {"wall_s": time.perf_counter() - t, "cpu_s": time.process_time() - c}
            best = run if best is None or run["wall_s"] < best["wall_s"] else best
        best["dice"] = dice(label, truth, organs)
        rec["runs"][name] = best
        print(f"{name:36s} wall {best['wall_s']:6.2f} s  cpu {best['cpu_s']:6.2f} s  dice "
              + ", ".join(f"{k}: {v:.4f}" for k, v in best["dice"].items()), flush=True)
    rec["load_average_end"] = load_average()
    print(f"device={rec['device_name']} load={rec['load_average']} -> {rec['load_average_end']} "
          f"query {args.query}, support {args.support}, {args.slices} slices, organs {organs}")
    emit_json(rec)
    return rec


if __name__ == "__main__":
    main()
