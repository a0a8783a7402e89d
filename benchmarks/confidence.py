"""Which per-slice confidence tells wrong slices apart, and what computing it costs.

    python -m benchmarks.confidence --data ../shared/data/abd-mri --checkpoint apps/sdfsmis/model --volumes 0 1 2 \
        --walker registration

Each volume: the middle slice of every organ annotated (lib.evaluation.annotator), one app propagation.
Candidates per segmented slice: `agreement` (that step's result vs its support: registered onto the slice
for the network walker, unmoved for the registration walker), `cumulative`
(their product from the annotated slice: the app's choice), `certainty` (mean |2p - 1| on the organ),
`distance` (1 - slices from the annotated one / 20). Printed: Spearman correlation of each with the
slice's Dice, and how good the slice each would suggest is: its wrong voxels / the worst slice's
(1 = the hindsight pick). Overhead: seconds in lib.pipeline.propagate._confidence and in the chain's
agreement Dice, against the whole propagation.
"""
from __future__ import annotations

import argparse
import importlib
import json
import time

import numpy as np
import torch

from lib.evaluation.annotator import load_case, middle_slice, segment, slice_dice, slice_errors
from lib.evaluation.dataset import EvalDataset
from lib.evaluation.protocol import DEFAULT_ORGANS
from lib.pipeline import WALKERS, PropagateOptions
from lib.pipeline.confidence import certainty, cumulative

prop = importlib.import_module("lib.pipeline.propagate")   # the module (lib.pipeline.propagate is also the function)
SIGNALS = ("agreement", "cumulative", "certainty", "distance")


def _rank(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    return r


def spearman(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.corrcoef(_rank(a), _rank(b))[0, 1]) if len(a) > 2 else float("nan")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--checkpoint", default="apps/sdfsmis/model")
    ap.add_argument("--volumes", type=int, nargs="*", help="volume indices (sorted by id); default all")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--walker", choices=WALKERS, default=PropagateOptions.walker, help="the app's `walker` [%(default)s]")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from lib.model import load_checkpoint

    name = "abd-ct" if "ct" in args.data.rstrip("/").split("/")[-1] else "abd-mri"
    ds = EvalDataset(args.data, DEFAULT_ORGANS[name])
    model = load_checkpoint(args.checkpoint)
    options = PropagateOptions.for_model(model, largest=True, walker=args.walker)
    seen, spent = {}, {"confidence": 0.0}
    original = prop._confidence

    def spy(result, probs, agree, source, annotation):
        t = time.perf_counter()
        original(result, probs, agree, source, annotation)
        spent["confidence"] += time.perf_counter() - t
        seen.update(probs=probs, agree=agree, source=source)

    prop._confidence = spy
    rows = {s: [] for s in SIGNALS}
    dices, picks, total_s = [], {s: [] for s in SIGNALS}, 0.0
    for v in args.volumes if args.volumes is not None else range(len(ds)):
        case = load_case(ds, v)
        chosen = {lid: [middle_slice(case, lid)] for lid in case.organs.values()}
        result = segment(model, options, case, chosen)
        total_s += result.seconds
        final = np.moveaxis(result.label, -1, 0)
        for lid in case.organs.values():
            mask = final == lid
            agree, source = seen["agree"][lid], seen["source"][lid]
            sig = {"agreement": agree, "cumulative": cumulative(agree, source),
                   "certainty": certainty(seen["probs"][lid], mask),
                   "distance": 1.0 - np.abs(np.arange(len(mask)) - source) / 20.0}
            sd, err = slice_dice(case, result.label, lid), slice_errors(case, result.label, lid)
            lo, hi = case.extent[lid]
            zs = [z for z in range(lo, hi + 1) if z not in chosen[lid] and np.isfinite(sd[z])]
            area = mask.reshape(len(mask), -1).sum(axis=1)
            for s in SIGNALS:
                ok = [z for z in zs if np.isfinite(sig[s][z])]
                rows[s] += [(sig[s][z], sd[z]) for z in ok]
                score = np.array([(1 - sig[s][z]) * area[z] if z in ok else -1 for z in range(len(mask))])
                score[chosen[lid]] = -1
                if err.max() > 0:
                    picks[s].append(err[int(np.argmax(score))] / err.max())
            dices += [sd[z] for z in zs]
        print(f"volume {case.case_id}: {result.seconds:.1f} s, confidence {spent['confidence']:.2f} s so far", flush=True)
    out = {"dataset": name, "volumes": args.volumes, "walker": args.walker, "seconds": round(total_s, 2),
           "confidence_seconds": round(spent["confidence"], 3),
           "overhead_percent": round(100 * spent["confidence"] / max(total_s, 1e-9), 2), "signals": {}}
    for s in SIGNALS:
        pairs = np.array(rows[s])
        out["signals"][s] = {"spearman_vs_slice_dice": round(spearman(pairs[:, 0], pairs[:, 1]), 3),
                             "slices": len(pairs), "pick_error_vs_worst": round(float(np.mean(picks[s])), 3)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
