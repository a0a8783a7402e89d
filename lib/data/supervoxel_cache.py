"""On-disk cache of pseudo-labels (body mask + supervoxels), keyed by image content and parameters.

One file per (image, spacing, parameters): `<cache_dir>/<sha1>.npz` holding `supervoxels` (uint16
(H, W, Z)) and `body` (bool (H, W, Z)). A changed image or parameter gives another key, so stale
results are never reused. Files are written to a temporary name and renamed (`os.replace`), so a
reader never sees a half-written file.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lib.data import pseudolabels as _pl

CACHE_VERSION = 1  # bump when the algorithm changes, so old cache files are ignored
ENV_CACHE_DIR = "SDFSMIS_PSEUDOLABEL_CACHE"

DEFAULT_PARAMS = {
    "fg_threshold": _pl.FG_THRESHOLD,
    "min_size": _pl.MIN_SIZE,
    "segment_size": _pl.SEGMENT_SIZE,
    "compactness": _pl.COMPACTNESS,
    "sigma": _pl.SIGMA,
    "max_iter": _pl.MAX_ITER,
}


@dataclass(frozen=True)
class PseudoLabels:
    """body (H, W, Z) bool, supervoxels (H, W, Z) uint16 (0 = outside body), where they came from."""

    body: np.ndarray
    supervoxels: np.ndarray
    from_cache: bool
    path: Path | None


def default_cache_dir() -> Path:
    """`$SDFSMIS_PSEUDOLABEL_CACHE` if set, else `~/.cache/sdfsmis/pseudolabels`."""
    env = os.environ.get(ENV_CACHE_DIR)
    return Path(env) if env else Path.home() / ".cache" / "sdfsmis" / "pseudolabels"


def resolve_params(**params) -> dict:
    """Defaults overridden by `params`; unknown names raise ValueError listing the valid ones."""
    unknown = sorted(set(params) - set(DEFAULT_PARAMS))
    if unknown:
        raise ValueError(f"unknown pseudo-label parameter(s) {unknown}; valid: {sorted(DEFAULT_PARAMS)}")
    out = dict(DEFAULT_PARAMS)
    out.update({k: v for k, v in params.items() if v is not None})
    return out


def cache_key(image, spacing, **params) -> str:
    """sha1 of the image bytes, shape, dtype, spacing, parameters and CACHE_VERSION."""
    arr = np.ascontiguousarray(image)
    meta = {
        "v": CACHE_VERSION,
        "shape": list(arr.shape),
        "dtype": str(arr.dtype),
        "spacing": [round(float(s), 6) for s in np.asarray(spacing, dtype=float).ravel()],
        "params": {k: float(v) for k, v in sorted(resolve_params(**params).items())},
    }
    h = hashlib.sha1(json.dumps(meta, sort_keys=True).encode())
    h.update(arr.view(np.uint8).reshape(-1).data if arr.size else b"")
    return h.hexdigest()


def _atomic_save(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp.npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _load(path: Path, shape) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        with np.load(path) as data:
            body, sv = data["body"].astype(bool), data["supervoxels"].astype(np.uint16)
    except (OSError, KeyError, ValueError, EOFError):
        return None  # unreadable or foreign file: recompute and overwrite
    if body.shape != tuple(shape) or sv.shape != tuple(shape):
        return None
    return body, sv


def compute_pseudolabels(image, spacing, **params) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, Z) image, spacing -> (body bool (H, W, Z), supervoxels uint16 (H, W, Z)); no cache."""
    p = resolve_params(**params)
    body = _pl.body_mask(image, threshold=p["fg_threshold"])
    sv = _pl.supervoxels(
        image,
        spacing,
        body=body,
        min_size=int(p["min_size"]),
        segment_size=int(p["segment_size"]),
        compactness=float(p["compactness"]),
        sigma=float(p["sigma"]),
        max_iter=int(p["max_iter"]),
    )
    return body, sv


def load_or_compute(image, spacing, cache_dir=None, **params) -> PseudoLabels:
    """Pseudo-labels of `image` from `cache_dir` when present, else computed and stored there.

    `cache_dir=None` computes without caching. The result says whether it was a cache hit.
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"expected a 3D image (H, W, Z), got shape {image.shape}")
    if cache_dir is None:
        body, sv = compute_pseudolabels(image, spacing, **params)
        return PseudoLabels(body, sv, False, None)
    path = Path(cache_dir) / f"{cache_key(image, spacing, **params)}.npz"
    if path.is_file():
        loaded = _load(path, image.shape)
        if loaded is not None:
            return PseudoLabels(loaded[0], loaded[1], True, path)
    body, sv = compute_pseudolabels(image, spacing, **params)
    _atomic_save(path, body=body, supervoxels=sv)
    return PseudoLabels(body, sv, False, path)


def get_pseudolabels(image, spacing, cache_dir=None, **params) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, Z) image, spacing (mm) -> (body mask bool (H, W, Z), supervoxels uint16 (H, W, Z)).

    Parameters (defaults in DEFAULT_PARAMS): fg_threshold, min_size, segment_size, compactness,
    sigma, max_iter. With `cache_dir`, computed once per image content + parameters.
    """
    res = load_or_compute(image, spacing, cache_dir=cache_dir, **params)
    return res.body, res.supervoxels
