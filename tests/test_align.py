"""Support alignment (lib.transforms.align): registration of a support slice onto a query slice."""
from __future__ import annotations

import numpy as np
import pytest

from lib.transforms.align import SliceAligner, support_aligner


def _blob(shape, cy, cx, ry=9.0, rx=7.0):
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    return np.exp(-(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2))


def _dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("size", [64, 128, 257])
def test_align_moves_the_support_onto_the_query(size):
    k = size / 64
    support_image = (0.2 + 0.7 * _blob((size, size), 30 * k, 28 * k, 9 * k, 7 * k)).astype(np.float32)
    support_mask = _blob((size, size), 30 * k, 28 * k, 9 * k, 7 * k) > 0.4
    truth_blob = _blob((size, size), 34 * k, 33 * k, 9 * k, 7 * k)
    query = (0.2 + 0.7 * truth_blob).astype(np.float32)
    aligner = SliceAligner()
    image, mask = aligner.align(query, support_image, support_mask)
    assert image.dtype == np.float32 and mask.dtype == bool and mask.shape == (size, size)
    assert _dice(mask, truth_blob > 0.4) > 0.85 > _dice(support_mask, truth_blob > 0.4) + 0.1
    organ = truth_blob > 0.1                              # (the warp pads the slice border with zeros)
    assert np.abs(image - query)[organ].mean() < 0.5 * np.abs(support_image - query)[organ].mean()
    assert aligner.failures == 0


def test_align_falls_back_to_the_unchanged_support():
    aligner = SliceAligner()
    flat = np.full((64, 64), 0.5, np.float32)
    moving = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    mask = np.zeros((64, 64), bool)                      # no organ: no sample for the metric
    image, out = aligner.align(flat, moving, mask)
    assert np.array_equal(out, mask) and np.array_equal(image, moving)
    assert aligner.failures == 1
    with pytest.raises(ValueError, match="one slice grid"):
        aligner.align(flat, flat[:32], mask)


def test_align_episode_and_the_model_names():
    aligner = support_aligner("registration")
    ep = {"support_image": (0.2 + 0.7 * _blob((64, 64), 30, 28)).astype(np.float32),
          "support_mask": (_blob((64, 64), 30, 28) > 0.4).astype(np.float32),
          "query_image": (0.2 + 0.7 * _blob((64, 64), 34, 33)).astype(np.float32),
          "query_mask": (_blob((64, 64), 34, 33) > 0.4).astype(np.float32)}
    out = aligner.align_episode(ep)
    assert out["query_image"] is ep["query_image"] and out["support_mask"].dtype == np.float32
    assert _dice(out["support_mask"] > 0, ep["query_mask"] > 0) > 0.85
    assert support_aligner("none") is None
    with pytest.raises(ValueError, match="none | registration"):
        support_aligner("optical-flow")
