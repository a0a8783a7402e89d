"""`python -m lib.data.precompute FOLDER [FOLDER ...]`: compute and cache the pseudo-labels
(body mask + 3D supervoxels) of every `image_*.nii(.gz)` in the folders, with a progress bar.

Training reads the same cache, so this only saves time at the first training start.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from tqdm import tqdm

from lib.data.supervoxel_cache import default_cache_dir, load_or_compute
from lib.data.volumes import DatasetError, find_pairs, load_volume


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lib.data.precompute", description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", help="dataset folders with image_K.nii.gz files (labels not needed)")
    ap.add_argument("--cache-dir", default=None, help=f"pseudo-label cache (default {default_cache_dir()})")
    args = ap.parse_args(argv)
    try:
        pairs = [p for folder in args.folders for p in find_pairs(folder, require_labels=False)]
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cache = args.cache_dir or default_cache_dir()
    hits, t0 = 0, time.perf_counter()
    bar = tqdm(pairs, desc="pseudo-labels", unit="vol")
    for pair in bar:
        image, spacing = load_volume(pair.image)
        res = load_or_compute(image, spacing, cache_dir=cache)
        hits += res.from_cache
        bar.set_postfix(case=pair.case_id, supervoxels=int(res.supervoxels.max()), cached=hits)
    print(f"{len(pairs)} volumes ({hits} from cache) in {time.perf_counter() - t0:.0f} s -> {cache}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
