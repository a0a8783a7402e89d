"""Per-volume Dice, HD95 and ASSD (mm) with monai.metrics, and their averaging.

Both masks are (H, W, Z) booleans that are zero outside the scored slices. Distances use the
header spacing and are computed on the crop around both masks (same values, much faster).
The surface distances of both directions are computed once (monai's get_edge_surface_distance)
and reduced exactly as compute_hausdorff_distance(percentile=95) and
compute_average_surface_distance(symmetric=True) do (checked in the tests).
Empty prediction: Dice 0; HD95/ASSD = the volume's diagonal in mm (rule "diagonal", default)
or NaN, left out of the means (rule "exclude").
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from monai.metrics import DiceMetric
from monai.metrics.utils import get_edge_surface_distance

EMPTY_RULES = ("diagonal", "exclude")


def volume_diagonal_mm(shape, spacing) -> float:
    """Length in mm of the diagonal of an (H, W, Z) volume."""
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing))))


def _crop(pred: np.ndarray, gt: np.ndarray, margin: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cropped to their joint bounding box padded by `margin` zero voxels."""
    both = pred | gt
    lo, hi = [], []
    for axis in range(both.ndim):
        other = tuple(a for a in range(both.ndim) if a != axis)
        idx = np.flatnonzero(both.any(axis=other))
        lo.append(idx[0])
        hi.append(idx[-1] + 1)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    pad = [(margin, margin)] * both.ndim
    return np.pad(pred[sl], pad), np.pad(gt[sl], pad)


def volume_metrics(pred, gt, spacing, empty: str = "diagonal") -> dict:
    """{'dice', 'hd95', 'assd' (mm), 'empty'} of one query volume; gt must not be empty."""
    if empty not in EMPTY_RULES:
        raise ValueError(f"empty-prediction rule must be one of {EMPTY_RULES}, got {empty!r}")
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth {gt.shape}")
    if not gt.any():
        raise ValueError("ground truth is empty: nothing to score")
    if not pred.any():
        penalty = volume_diagonal_mm(gt.shape, spacing) if empty == "diagonal" else float("nan")
        return {"dice": 0.0, "hd95": penalty, "assd": penalty, "empty": True}
    p, g = _crop(pred, gt)
    p_t = torch.from_numpy(p)[None, None].float()
    g_t = torch.from_numpy(g)[None, None].float()
    spacing = [float(s) for s in spacing]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dice = DiceMetric(include_background=True, reduction="none")(p_t, g_t)
        _, distances, _ = get_edge_surface_distance(p_t[0, 0], g_t[0, 0], distance_metric="euclidean",
                                                    spacing=spacing, symmetric=True)
    hd95 = max(float(torch.quantile(d.float(), 0.95)) for d in distances)  # = compute_hausdorff_distance
    assd = float(torch.cat(distances).float().mean())                     # = compute_average_surface_distance
    return {"dice": float(dice.item()), "hd95": hd95, "assd": assd, "empty": False}


def _mean(values) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def aggregate(records: list[dict], organs: list[str], keys=("dice", "hd95", "assd")) -> dict:
    """Per organ: mean over query volumes within a fold, then over folds; plus the organ mean.

    records: [{'fold', 'organ', 'dice', 'hd95', 'assd', ...}] -> {key: {organ: v, 'mean': v},
    'per_fold': {key: {fold: {organ: v}}}, 'n_volumes': {organ: n}}.
    """
    out: dict = {"per_fold": {k: {} for k in keys}, "n_volumes": {}}
    for key in keys:
        table = {}
        for organ in organs:
            rows = [r for r in records if r["organ"] == organ]
            folds = sorted({r["fold"] for r in rows}, key=str)
            fold_means = {}
            for f in folds:
                fold_means[f] = _mean(r[key] for r in rows if r["fold"] == f)
                out["per_fold"][key].setdefault(str(f), {})[organ] = fold_means[f]
            table[organ] = _mean(fold_means.values())
            out["n_volumes"][organ] = len(rows)
        table["mean"] = _mean(table[o] for o in organs)
        out[key] = table
    return out
