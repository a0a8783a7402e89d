"""Support alignment: 2D registration of a support slice onto a query slice (SimpleITK).

The `mini` model is trained and served with *registration-aligned supports* (`align_support =
"registration"` in its config, not in the paper): before the network sees an episode, the support
image and mask are warped onto the query slice, so the network starts from where registration puts
the organ and learns what registration gets wrong (docs/model.md). The `registration` baseline of
the evaluation is this alignment alone.

Both slices are block-averaged to a grid of about `grid` px (256 -> 64); affine, mean squares,
regular-step gradient descent, the metric restricted to the support organ dilated by `mask_margin`
(a fraction of the slice width); then fast symmetric-forces demons. Deterministic.
"""
from __future__ import annotations

import threading

import numpy as np

from lib.model.config import ALIGNMENTS


class SliceAligner:
    """Registers a support slice (moving) onto a query slice (fixed) and warps its image and mask.

    grid: registration grid size in px (slices are block-averaged by max(1, round(H / grid)));
    mask_margin: the metric's dilation of the support organ, as a fraction of the slice height
    (40 px at 256); affine_iterations, demons_iterations, demons_sigma (px of the grid); threads: ITK.
    `align` may run in several Python threads at once (lib.pipeline.step.Step aligns a batch so).
    """

    def __init__(self, grid: int = 64, mask_margin: float = 40 / 256, affine_iterations: int = 30,
                 demons_iterations: int = 20, demons_sigma: float = 1.5, threads: int = 1):
        import SimpleITK as sitk

        self.sitk = sitk
        sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(int(threads))
        self.params = {"grid": grid, "mask_margin": mask_margin, "affine_iterations": affine_iterations,
                       "demons_iterations": demons_iterations, "demons_sigma": demons_sigma, "threads": threads,
                       "metric": "MeanSquares", "transform": "affine + demons"}
        self.failures = 0
        self._count = threading.Lock()

    def _shrink(self, shape) -> int:
        return max(1, int(round(shape[0] / self.params["grid"])))

    def _small(self, arr: np.ndarray, k: int):
        """(H, W) -> SimpleITK image block-averaged by k, placed in full-resolution pixel coordinates."""
        h, w = arr.shape[0] // k, arr.shape[1] // k
        small = arr[: h * k, : w * k].reshape(h, k, w, k).mean(axis=(1, 3)).astype(np.float32)
        img = self.sitk.GetImageFromArray(small)
        img.SetSpacing((float(k), float(k)))
        img.SetOrigin(((k - 1) / 2.0, (k - 1) / 2.0))
        return img

    def register(self, fixed: np.ndarray, moving: np.ndarray, moving_mask: np.ndarray):
        """(H, W) slices, bool mask of `moving` -> transform mapping fixed (query) to moving (support) points.
        Raises RuntimeError when ITK cannot register (e.g. too few samples inside the mask)."""
        sitk, p = self.sitk, self.params
        k = self._shrink(fixed.shape)
        f, m = self._small(np.asarray(fixed, np.float32), k), self._small(np.asarray(moving, np.float32), k)
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMeanSquares()
        if p["mask_margin"]:
            radius = max(1, int(round(p["mask_margin"] * fixed.shape[0] / k)))
            organ = sitk.Cast(self._small(np.asarray(moving_mask, np.float32), k) > 0, sitk.sitkUInt8)
            reg.SetMetricMovingMask(sitk.BinaryDilate(organ, [radius, radius]))
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-3, p["affine_iterations"], relaxationFactor=0.6)
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetInitialTransform(sitk.AffineTransform(2), inPlace=False)   # slices share the pixel grid
        tx = reg.Execute(f, m)
        if p["demons_iterations"]:
            warped = sitk.Resample(m, f, tx, sitk.sitkLinear, 0.0)
            demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
            demons.SetNumberOfIterations(p["demons_iterations"])
            demons.SetStandardDeviations(p["demons_sigma"])
            field = demons.Execute(f, warped)
            tx = sitk.CompositeTransform([tx, sitk.DisplacementFieldTransform(field)])
        return tx

    def _resample(self, arr: np.ndarray, reference: np.ndarray, tx, nearest: bool) -> np.ndarray:
        sitk = self.sitk
        out = sitk.Resample(sitk.GetImageFromArray(arr), sitk.GetImageFromArray(reference), tx,
                            sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear, 0)
        return sitk.GetArrayFromImage(out)

    def align(self, query: np.ndarray, support_image: np.ndarray, support_mask: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
        """(H, W) query, support image and mask (same grid) -> (support image float32, mask bool) warped
        onto the query. Unchanged when registration fails or warps the mask out of the slice
        (counted in `failures`)."""
        query = np.asarray(query, dtype=np.float32)
        image = np.asarray(support_image, dtype=np.float32)
        mask = np.asarray(support_mask).astype(bool)
        if image.shape != mask.shape:
            raise ValueError(f"alignment needs the support image and mask on one slice grid: {image.shape}, {mask.shape}")
        if query.shape != image.shape:   # another volume's slice size: onto the query's grid first
            image, mask = to_grid(image, mask, query.shape)
        try:
            tx = self.register(query, image, mask)
        except RuntimeError:
            return self._failed(image, mask)
        warped = self._resample(mask.astype(np.uint8), query, tx, nearest=True).astype(bool)
        if not warped.any():
            return self._failed(image, mask)
        return self._resample(image, query, tx, nearest=False).astype(np.float32), warped

    def _failed(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self._count:
            self.failures += 1
        return image, mask

    def warp_mask(self, query: np.ndarray, support_image: np.ndarray, support_mask: np.ndarray) -> np.ndarray:
        """The support mask registered onto the query: bool (H, W) (the registration baseline)."""
        return self.align(query, support_image, support_mask)[1]

    def align_episode(self, episode: dict) -> dict:
        """A training episode (lib.transforms.augment) with its support image and mask aligned to its query."""
        image, mask = self.align(episode["query_image"], episode["support_image"], episode["support_mask"] > 0.5)
        return dict(episode, support_image=image, support_mask=mask.astype(np.float32))


def to_grid(image: np.ndarray, mask: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
    """A support slice and mask of another size -> float32 and bool resampled to `shape` (H, W) over the
    same extent (image linear, mask nearest); unchanged (as arrays) when the sizes agree."""
    import SimpleITK as sitk

    image, mask = np.asarray(image, dtype=np.float32), np.asarray(mask).astype(bool)
    if image.shape == tuple(shape):
        return image, mask
    src = sitk.GetImageFromArray(np.ascontiguousarray(image))
    src.SetSpacing((shape[1] / image.shape[1], shape[0] / image.shape[0]))
    src.SetOrigin(tuple(0.5 * s - 0.5 for s in src.GetSpacing()))
    ref = sitk.Image(int(shape[1]), int(shape[0]), sitk.sitkFloat32)
    out = sitk.Resample(src, ref, sitk.Transform(), sitk.sitkLinear, 0.0)
    src_mask = sitk.GetImageFromArray(mask.astype(np.uint8))
    src_mask.CopyInformation(src)
    out_mask = sitk.Resample(src_mask, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(out).astype(np.float32), sitk.GetArrayFromImage(out_mask).astype(bool)


def support_aligner(name: str, **params) -> SliceAligner | None:
    """A model's `align_support` -> its aligner (None for "none"); unknown names raise ValueError."""
    if name not in ALIGNMENTS:
        raise ValueError(f"unknown support alignment {name!r}: choose one of {' | '.join(ALIGNMENTS)}")
    return SliceAligner(**params) if name == "registration" else None
