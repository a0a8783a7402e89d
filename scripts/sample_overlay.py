"""Segment the sample phantom study with the model the app serves, score it and draw an overlay.

    .venv/bin/python scripts/sample_overlay.py --out sample-overlay.png [--checkpoint FOLDER] [--no-chain] [--no-gate]

The phantom (lib.sample) has a known ground truth: its one-slice label is the app's support and the
other slices are scored (Dice per organ). The PNG shows a few slices, ground truth green, result red.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lib.configs.app_config import parse_conf  # noqa: E402
from lib.evaluation.report import write_overlays  # noqa: E402
from lib.configs.model_store import ModelStore  # noqa: E402
from lib.pipeline import PropagateOptions, propagate  # noqa: E402
from lib.sample import one_slice, phantom  # noqa: E402

ORGANS = {1: "liver", 2: "right kidney", 3: "left kidney", 4: "spleen"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="PNG to write")
    ap.add_argument("--checkpoint", help="serve this checkpoint folder instead of the app's choice")
    ap.add_argument("--no-chain", action="store_true", help="without chained propagation (the app's `chain false`)")
    ap.add_argument("--no-gate", action="store_true", help="without the intensity gate (the app's `gate false`)")
    ap.add_argument("--slices", type=int, default=4, help="slices shown")
    args = ap.parse_args(argv)

    cfg = parse_conf({"checkpoint": args.checkpoint} if args.checkpoint else {})
    store = ModelStore(cfg, ROOT / "apps" / "sdfsmis")
    model = store.get()
    image, truth = phantom(seed=1)                       # phantom_1, the study's annotated volume
    support = one_slice(truth)
    z0 = int(np.flatnonzero(support.any(axis=(0, 1)))[0])
    gate, chain = cfg.gate and not args.no_gate, cfg.chain and not args.no_chain
    options = PropagateOptions.for_model(model, cfg.threshold, chain=chain, gate=gate, largest=cfg.largest)
    result = propagate(model, image, support, options).label
    scored = [z for z in range(truth.shape[-1]) if z != z0]
    print(f"model: {store.source.describe()}; chain {chain}; gate {gate}; annotated slice {z0}; "
          f"{result.shape[-1]} slices")
    for value, name in ORGANS.items():
        gt, pred = truth[..., scored] == value, result[..., scored] == value
        dice = 2 * (gt & pred).sum() / max(gt.sum() + pred.sum(), 1)
        print(f"  {name}: Dice {dice:.3f} over the {len(scored)} unannotated slices")
    lo, hi = image.min(), image.max()
    shown = np.linspace(0, len(scored) - 1, args.slices).round().astype(int)
    slices = [{"z": scored[i], "image": (image[..., scored[i]] - lo) / (hi - lo),
               "gt": truth[..., scored[i]] > 0, "pred": result[..., scored[i]] > 0} for i in shown]
    gt_all, pred_all = truth[..., scored] > 0, result[..., scored] > 0
    dice_all = 2 * (gt_all & pred_all).sum() / max(gt_all.sum() + pred_all.sum(), 1)
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        files = write_overlays(Path(tmp), {"organs": {"slices": slices, "query": "phantom_1", "fold": "-",
                                                      "dice": dice_all}}, f"sample study, annotated z={z0}")
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(tmp) / Path(files[0]).name, out)
    print(f"all organs: Dice {dice_all:.3f}; overlay: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
