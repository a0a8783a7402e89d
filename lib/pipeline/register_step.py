"""The registration step: `Step`'s interface with the support mask registered onto each query as the result.

Inside one volume the app can walk with registration instead of the network (the `walker` option):
each slice's mask is its neighbour's, registered onto it (lib.transforms.align.SliceAligner, the
`registration` baseline of the evaluation walks so), then gated and refined as the network's walk
is. Measured on the paper's data it walks better than the shipped network in a third of the time
(docs/evaluation.md, "Inside one volume: the walker"). Probabilities are the warped masks, 1.0 / 0.0.
"""
from __future__ import annotations

import numpy as np
import torch

from lib.pipeline.step import in_threads
from lib.transforms.align import SliceAligner, to_grid


class RegistrationStep:
    """`pairs` / `shared` as lib.pipeline.step.Step, by registration alone (no forward pass).

    threshold: the pipeline's mask threshold (so that decisions downstream read these probabilities as
    the network's); aligner: a SliceAligner (default: the baseline's parameters, 1 ITK thread);
    workers: threads registering the pairs of one call at once (None: torch's thread count).
    """

    def __init__(self, threshold: float, aligner: SliceAligner | None = None, workers: int | None = None):
        self.threshold = float(threshold)
        self.aligner = aligner or SliceAligner(threads=1)
        self.workers = max(1, torch.get_num_threads() if workers is None else int(workers))
        self.forward_passes = 0

    def _warp(self, query, image, mask) -> np.ndarray:
        if not np.asarray(mask).any():
            raise ValueError("a support mask is empty: every query needs the organ on its support slice")
        return self.aligner.warp_mask(query, image, mask)

    def pairs(self, queries, images, masks, keep_pixels: int = 0, supports: bool = False):
        """queries (B, H, W), support images (B, H', W'), masks bool (B, H', W') -> (probabilities float32
        (B, H, W), kept bool (B,)): each support mask registered onto its query; a pair is kept when at
        least `keep_pixels` pixels are warped in. supports: also the support masks unmoved on the query
        grid, bool (B, H, W) (the step's agreement then measures how much the organ moved and changed)."""
        queries = np.asarray(queries, dtype=np.float32)
        idx = range(len(queries))
        warped = in_threads(lambda i: self._warp(queries[i], images[i], masks[i]), idx, self.workers)
        warped = np.stack(warped) if warped else np.zeros(queries.shape, dtype=bool)
        kept = warped.reshape(len(warped), -1).sum(axis=1) >= keep_pixels
        probs = np.where(kept[:, None, None], warped, False).astype(np.float32)
        if not supports:
            return probs, kept
        seen = np.stack([to_grid(np.asarray(images[i], np.float32), masks[i], queries.shape[1:])[1] for i in idx])
        return probs, kept, seen

    def shared(self, queries, image, mask) -> np.ndarray:
        """queries (N, H, W) from one support slice image (H', W') + mask (H', W') -> probabilities (N, H, W)."""
        n = len(queries)
        mask = np.asarray(mask, dtype=bool)
        if not mask.any():
            raise ValueError("the support mask is empty: annotate the organ on the support slice")
        return self.pairs(queries, np.repeat(np.asarray(image)[None], n, 0), np.repeat(mask[None], n, 0))[0]
