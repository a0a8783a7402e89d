"""One propagation step on ground-truth organs: how well does slice z's mask carry to slice z + 1?

    .venv/bin/python scripts/step_check.py --data ../shared/data/abd-mri --checkpoint apps/sdfsmis/model

For adjacent slice pairs of each organ (every `--volume-step`-th volume, every `--slice-step`-th slice,
both masks >= 50 px), the ground truth of slice z is the support and slice z + 1 is scored (Dice %):
copy (the mask itself), registration (lib.transforms.align), the network with the support registered
onto the query and without, and two ceilings of the network's representation: the mask through the
128 px round trip and through the VAE. A chain is as good as its steps, so this isolates what the
network adds to registration. Prints one line of means; `--json` writes them too.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lib.evaluation.dataset import EvalDataset  # noqa: E402
from lib.evaluation.protocol import DATASETS, DEFAULT_ORGANS, detect_dataset  # noqa: E402
from lib.model import load_checkpoint  # noqa: E402
from lib.pipeline.step import Step, resize_mask, resize_slices  # noqa: E402
from lib.transforms.align import SliceAligner  # noqa: E402


def dice(a, b) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * (a & b).sum() / total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="folder of image_K / label_K volumes")
    ap.add_argument("--checkpoint", required=True, help="SD-FSMIS checkpoint folder")
    ap.add_argument("--dataset", choices=DATASETS, help="label layout (default: from the folder name)")
    ap.add_argument("--volume-step", type=int, default=2)
    ap.add_argument("--slice-step", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write the means here too")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    organs = DEFAULT_ORGANS[args.dataset or detect_dataset(Path(args.data).name)]
    data = EvalDataset(args.data, organs)
    model = load_checkpoint(args.checkpoint, device="cpu").eval()
    size = model.config.image_size
    aligner = SliceAligner(threads=args.threads)
    step = Step(model, model.config.threshold)     # unaligned: the supports are given as they should be seen
    scores: dict[str, list[float]] = {k: [] for k in ("copy", "registration", "network_aligned", "network_unaligned",
                                                      "ceiling_resize", "ceiling_vae")}
    for v in range(0, len(data), args.volume_step):
        image, label, _ = data.load(v)
        for organ, value in organs.items():
            zs = set(data.slices[v][organ])
            for z in sorted(zs)[::args.slice_step]:
                support, truth = label[..., z] == value, label[..., z + 1] == value
                if z + 1 not in zs or support.sum() < 50 or truth.sum() < 50:
                    continue
                query, s_img = image[..., z + 1], image[..., z]
                a_img, a_mask = aligner.align(query, s_img, support)
                with torch.inference_mode():
                    small = resize_mask(truth[None].astype(np.float32), size).float()
                    vae = model.decode(model.encode(small)) > 0.5
                    aligned = step.shared(query[None], a_img, a_mask)[0] > step.threshold
                    unaligned = step.shared(query[None], s_img, support)[0] > step.threshold
                    scores["network_aligned"].append(dice(aligned, truth))
                    scores["network_unaligned"].append(dice(unaligned, truth))
                scores["copy"].append(dice(support, truth))
                scores["registration"].append(dice(a_mask, truth))
                scores["ceiling_resize"].append(dice(resize_slices(small, truth.shape)[0, 0].numpy() > 0.5, truth))
                scores["ceiling_vae"].append(dice(resize_slices(vae.float(), truth.shape)[0, 0].numpy() > 0.5, truth))
    means = {k: round(100 * float(np.mean(x)), 2) for k, x in scores.items()}
    print(f"{args.data}: {len(scores['copy'])} slice pairs, Dice %: " + ", ".join(f"{k} {m}" for k, m in means.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"pairs": len(scores["copy"]), "dice": means}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
