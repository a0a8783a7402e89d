"""A step's masks refined by where the organ was put (the place term) and by what its pixels' intensities
say (log-odds of the organ against its surroundings): across volumes inside the appearance fusion
(lib.pipeline.appearance), inside one volume on the chained walk's result (lib.pipeline.propagate).

    place logit = weight * SCALE * signed_distance(mask) / radius        (radius: RADIUS of the slice height)
    first       = logit + SUPPORT_INTENSITY * log_odds(annotated organ vs its surroundings) > 0
    final       = logit + QUERY_INTENSITY * log_odds(the query's `first` vs its surroundings) > 0

The annotated organ's intensities tell the first mask; the query's own (another patient's organ is a
little brighter or darker; inside one volume the organ drifts from the annotated slice's values) then
replace them: across volumes each slice's from its neighbours within lib.pipeline.appearance.WINDOW
(so that a slice gets the same whichever slices are asked for), inside one volume from every slice
the walk reached. The features and the step see the organ coarsely; intensity draws its edge to the
pixel. Weights chosen on fold 0 (docs/evaluation.md, "Intensity: the organ's own values").
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from lib.model.prototypes import SCALE       # logit per radius at weight 1: the prototypes' cosine scale
from lib.transforms.intensity import intensity_counts, log_odds, log_odds_at, organ_log_odds

RADIUS = 40 / 256          # of the slice height: SliceAligner's default mask_margin
SUPPORT_INTENSITY = 0.75   # weight of the annotated organ's intensity log-odds (first pass)
QUERY_INTENSITY = 1.0      # weight of the query's own organ's intensity log-odds (second pass)
MIN_ORGAN = 50             # pixels: fewer of the first mask where a slice's statistics come from: none
INSIDE = 1.0               # inside one volume: the place weight (no appearance logit beside it)


def signed_distance(mask: np.ndarray) -> np.ndarray:
    """bool (H, W) -> float32 (H, W): distance to the mask's edge in pixels, positive inside, negative
    outside; an empty mask is -inf everywhere (no place)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return np.full(mask.shape, -np.inf, dtype=np.float32)
    return (ndimage.distance_transform_edt(mask) - ndimage.distance_transform_edt(~mask)).astype(np.float32)


def place_logit(distance: np.ndarray, weight: float) -> np.ndarray:
    """Signed distances (N, H, W) in pixels -> the place term's logit: `weight` x SCALE per radius."""
    return weight * SCALE * distance / (RADIUS * distance.shape[-2])


def with_intensities(logit, queries, support_images, support_masks, positions=None, window: int | None = None):
    """logit (N, H, W) (place, and appearance across volumes), the query slices (N, H, W) in [0, 1], the
    annotated slices (H', W') or (k, H', W') and their organ masks -> bool (N, H, W): the two passes of
    the module docstring. The query's statistics: with `window`, each slice's from the slices within
    +-window of its position (`positions`, the N slices' indices in the volume, ascending; default
    0..N-1), else from all N; where they hold under MIN_ORGAN organ pixels, the first mask stays."""
    queries = np.asarray(queries, dtype=np.float32)
    support_images = np.asarray(support_images, dtype=np.float32)
    table = organ_log_odds(support_images, support_masks, RADIUS * support_images.shape[-2])
    first = logit + SUPPORT_INTENSITY * log_odds_at(table, queries) > 0
    organ, band = intensity_counts(queries, first, RADIUS * queries.shape[-2])
    positions = np.arange(len(queries)) if positions is None else np.asarray(positions)
    out = first.copy()
    for i, at in enumerate(positions):
        near = np.abs(positions - at) <= (np.inf if window is None else window)
        if organ[near].sum() >= MIN_ORGAN:
            table = log_odds(organ[near].sum(0), band[near].sum(0))
            out[i] = logit[i] + QUERY_INTENSITY * log_odds_at(table, queries[i]) > 0
    return out


def refine_inside(queries, masks, support_images, support_masks, weight: float = INSIDE) -> np.ndarray:
    """Inside one volume: a walk's masks bool (N, H, W) on `queries` (N, H, W), the organ's annotated
    slices and masks (k, H, W) -> bool (N, H, W). A slice the walk left empty stays empty."""
    masks = np.asarray(masks, dtype=bool)
    if not masks.any():
        return masks.copy()
    logit = place_logit(np.stack([signed_distance(m) for m in masks]), weight)
    return with_intensities(logit, queries, support_images, support_masks)
