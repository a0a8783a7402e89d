"""The step: segment query slices from 1-shot supports, on slices of any size.

align (registration-aligned supports, the `mini` model's `align_support`) -> resize to network size
(a tiny organ kept, `resize_mask`) -> encode the support (SII tokens, QE prototype, VTCT embedding) ->
predict -> resize back -> prior edits (`edit_prior`). Every caller goes through `Step`: the chained
walk, cross-volume segmentation, per-slice segmentation, the evaluation.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

Align = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def resize_slices(x, size) -> torch.Tensor:
    """(N, H, W) or (N, 1, H, W) array/tensor -> float32 (N, 1, *size), bilinear (antialiased when shrinking)."""
    t = torch.as_tensor(np.ascontiguousarray(x) if not torch.is_tensor(x) else x).float()
    if t.ndim == 3:
        t = t[:, None]
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(t.shape[-2:]) == size:
        return t
    return F.interpolate(t, size=size, mode="bilinear", antialias=True, align_corners=False)


def resize_mask(mask, size) -> torch.Tensor:
    """(N, H, W) or (N, 1, H, W) binary mask -> bool (N, 1, *size): > 0.5 after `resize_slices`, or any
    coverage at all on a slice where that leaves nothing (a tiny organ must survive the shrink)."""
    small = resize_slices(mask, size)
    strict = small > 0.5
    empty = ~strict.flatten(1).any(dim=1)
    return torch.where(empty.view(-1, 1, 1, 1), small > 0, strict)


def distinct_rows(x: np.ndarray) -> tuple[list[int], np.ndarray]:
    """(N, ...) array -> (positions of its D distinct rows, first occurrences in order; index int64 (N,)
    of each row among them): equal rows are equal bytes."""
    first: dict[bytes, int] = {}
    index = np.array([first.setdefault(np.ascontiguousarray(row).tobytes(), len(first)) for row in x], np.int64)
    return np.unique(index, return_index=True)[1].tolist(), index   # ids follow first occurrence


def in_threads(fn, idx, workers: int) -> list:
    """[fn(i) for i in idx] on up to `workers` threads (in order); one thread or one item: in this one.
    SimpleITK registers outside the GIL, so the supports of a batch align at once."""
    idx = list(idx)
    if workers == 1 or len(idx) < 2:
        return [fn(i) for i in idx]
    with ThreadPoolExecutor(min(workers, len(idx))) as pool:
        return list(pool.map(fn, idx))


def decided(probs, keep, threshold: float) -> np.ndarray:
    """Probabilities (N, H, W) after a decision `keep` bool (N, H, W) made outside the network (the gate,
    the appearance fusion): kept pixels at least just above `threshold`, the others 0 (so that
    probabilities > threshold is the decision)."""
    above = np.nextafter(np.float32(threshold), np.float32(1))
    return np.where(keep, np.maximum(probs, above), 0.0).astype(np.float32)


def apply_prior_edits(probs, prior_probs, prior_masks, threshold: float):
    """The network's changes applied to the full-resolution prior (model config `edit_prior`).

    probs, prior_probs: (N, H, W) probabilities of the prediction and of the decoded support-mask
    latent (what a `prior_residual` network predicts when it changes nothing); prior_masks: (N, H, W)
    the support masks on the query grid. Where the two decisions agree, the prior mask's own pixels
    (1 / 0) are kept; elsewhere the network's probability. numpy in, numpy out.
    """
    same = (np.asarray(probs) > threshold) == (np.asarray(prior_probs) > threshold)
    return np.where(same, np.asarray(prior_masks, dtype=np.float32), probs).astype(np.float32)


class Step:
    """One network step for a model: `pairs` (each query its own support) and `shared` (one support
    for many queries; the support branch runs once unless supports are aligned per query).

    threshold: resolved mask threshold; align(query, support image, support mask) -> (image, mask) on
    the query's grid, or None; batch_size: pairs / queries per forward pass; workers: threads that align
    the supports of one batch at once (SimpleITK registers outside the GIL; each alignment is the same as
    alone), None: torch's thread count, the CPU threads the network of the batch uses next. All
    probabilities are float32 numpy (N, H, W) on the query grid.
    """

    def __init__(self, model, threshold: float, align: Align | None = None, batch_size: int = 8,
                 workers: int | None = None):
        self.model = model
        self.threshold = float(threshold)
        self.align = align
        self.batch_size = max(1, int(batch_size))
        self.workers = max(1, torch.get_num_threads() if workers is None else int(workers))
        self.size = model.config.image_size
        self.edit = bool(getattr(model.config, "edit_prior", False))
        self.forward_passes = 0

    def _support(self, query: np.ndarray, image: np.ndarray, mask: np.ndarray):
        """A support (H', W') for `query` (H, W): aligned onto it, or as given."""
        return (image, mask) if self.align is None else self.align(query, image, mask)

    def _supports(self, queries, images, masks, idx) -> list[tuple[np.ndarray, np.ndarray]]:
        """The supports of pairs `idx`, aligned on up to `workers` threads (in order)."""
        return in_threads(lambda i: self._support(queries[i], images[i], masks[i]), idx,
                          1 if self.align is None else self.workers)

    @torch.inference_mode()
    def pairs(self, queries, images, masks, keep_pixels: int = 0, supports: bool = False):
        """queries (B, H, W) in [0, 1], support images (B, H', W'), masks bool (B, H', W') ->
        (probabilities (B, H, W), kept bool (B,)): a pair is kept when at least `keep_pixels` pixels pass
        the threshold at network size (0: always); a pair not kept has probability 0. supports: also
        return the support masks as the network saw them on the query grid, bool (B, H, W) (registered
        onto each query for an aligned model: the registration's own estimate of the query mask)."""
        queries = np.asarray(queries, dtype=np.float32)
        b, h, w = queries.shape
        out, kept = np.zeros((b, h, w), dtype=np.float32), np.zeros(b, dtype=bool)
        seen = np.zeros((b, h, w), dtype=bool) if supports else None
        for start in range(0, b, self.batch_size):
            idx = range(start, min(b, start + self.batch_size))
            seen_by = self._supports(queries, images, masks, idx)   # (image, mask) per query
            s_full = np.stack([np.asarray(m, dtype=np.float32) for _, m in seen_by])
            s_img = resize_slices(np.stack([np.asarray(im, dtype=np.float32) for im, _ in seen_by]), self.size)
            s_mask = resize_mask(s_full, self.size).float()
            if not s_mask.flatten(1).any(dim=1).all():
                raise ValueError("a support mask is empty: every query needs the organ on its support slice")
            cache = self.model.encode_supports(s_img, s_mask)          # one 1-shot support per query
            small = self._predict(queries[list(idx)], cache)
            self.forward_passes += 1
            ok = (small > self.threshold).flatten(1).sum(dim=1) >= keep_pixels
            probs = resize_slices(small, (h, w))[:, 0].numpy()
            if self.edit or seen is not None:
                on_query = resize_slices(s_full, (h, w))[:, 0].numpy() > 0.5
            if self.edit:
                prior = resize_slices(self.model.decode_prior(cache).float().cpu(), (h, w))[:, 0].numpy()
                probs = apply_prior_edits(probs, prior, on_query, self.threshold)
            if seen is not None:
                seen[list(idx)] = on_query
            out[list(idx)] = np.where(ok.numpy()[:, None, None], probs, 0.0)
            kept[list(idx)] = ok.numpy()
        return (out, kept) if seen is None else (out, kept, seen)

    def _predict(self, queries: np.ndarray, cache) -> torch.Tensor:
        """queries (B, H, W), one per support of `cache` -> probabilities (B, 1, S, S) at network size.
        A slice that several supports segment (organs walking from one slice) is resized and encoded once."""
        rows, index = distinct_rows(queries)
        if len(rows) == len(queries):
            return self.model.predict(resize_slices(queries, self.size), cache).float().cpu()
        return self.model.predict(resize_slices(queries[rows], self.size), cache,
                                  index=torch.from_numpy(index)).float().cpu()

    @torch.inference_mode()
    def shared(self, queries, image, mask) -> np.ndarray:
        """queries (N, H, W) in [0, 1] from one support slice image (H', W') + mask (H', W') -> probabilities
        (N, H, W). Unaligned, the support is encoded once for all N queries."""
        queries = np.asarray(queries, dtype=np.float32)
        mask = np.asarray(mask, dtype=bool)
        if not mask.any():
            raise ValueError("the support mask is empty: annotate the organ on the support slice")
        n, h, w = queries.shape
        if self.align is not None:
            return self.pairs(queries, np.repeat(np.asarray(image)[None], n, 0), np.repeat(mask[None], n, 0))[0]
        cache = self.model.encode_support(resize_slices(np.asarray(image, np.float32)[None], self.size),
                                          resize_mask(mask[None].astype(np.float32), self.size).float())
        if self.edit:
            prior = resize_slices(self.model.decode_prior(cache).float().cpu(), (h, w))[:, 0].numpy()
            prior_mask = resize_slices(mask[None].astype(np.float32), (h, w))[:, 0].numpy() > 0.5
        out = np.zeros((n, h, w), dtype=np.float32)
        for start in range(0, n, self.batch_size):
            sl = slice(start, start + self.batch_size)
            probs = resize_slices(self.model.predict(resize_slices(queries[sl], self.size), cache).float().cpu(),
                                  (h, w))[:, 0].numpy()
            self.forward_passes += 1
            out[sl] = apply_prior_edits(probs, prior, prior_mask, self.threshold) if self.edit else probs
        return out
