"""Place x intensity (lib.pipeline.refine): a walk's masks inside one volume refined to the organ's edge,
and the app's pipeline doing so on the chained result."""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from lib.pipeline.refine import refine_inside


def _volume(n=4, size=256, seed=0):
    """(N, H, W) slices in [0, 1]: a disc organ (value 0.7) of radius size/6 growing by a pixel a slice,
    on a noisy body (0.35)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size]
    c, r = size // 2, size // 6
    organs = np.stack([(y - c) ** 2 + (x - c - i) ** 2 < (r + i) ** 2 for i in range(n)])
    body = 0.35 + 0.03 * rng.standard_normal((n, size, size))
    return np.where(organs, 0.7 + 0.03 * rng.standard_normal((n, size, size)), body).clip(0, 1).astype(np.float32), organs


def _dice(a, b) -> float:
    return 2 * float((a & b).sum()) / max(int(a.sum() + b.sum()), 1)


def test_refine_inside_draws_a_walks_overgrown_masks_to_the_organs_edge():
    q, organs = _volume()
    walked = np.stack([ndimage.binary_dilation(o, iterations=4) for o in organs])   # 4 px: 2 logits of place
    walked[3] = False                                              # the walk ended before the last slice
    refined = refine_inside(q[1:], walked[1:], q[:1], organs[:1])
    assert all(_dice(r, o) > 0.97 > _dice(w, o) for r, w, o in zip(refined[:2], walked[1:3], organs[1:3]))
    assert not refined[2].any()                                    # an empty slice stays empty
    assert not refine_inside(q, np.zeros_like(organs), q[:1], organs[:1]).any()


def test_propagation_inside_one_volume_refines_the_chained_result():
    """With `intensity` (the app's default) the chained walk's masks are those of refine_inside on the
    walk without it; the annotated slice is kept as drawn; across volumes without appearance nothing changes."""
    from lib.model import build_model
    from lib.pipeline import PropagateOptions, propagate

    torch.manual_seed(0)
    model = build_model("tiny").eval()
    q, organs = _volume(n=5, size=96)
    image = np.moveaxis(q, 0, -1)
    ann = np.zeros(image.shape, np.uint8)
    ann[..., 2] = organs[2]
    on = PropagateOptions.for_model(model, chain=True, gate=False, largest=False)
    off = on.but(intensity=False)
    walked = np.moveaxis(propagate(model, image, ann, off, normalized=True).label > 0, -1, 0)
    refined = np.moveaxis(propagate(model, image, ann, on, normalized=True).label > 0, -1, 0)
    expected = refine_inside(q, np.where(np.arange(5)[:, None, None] == 2, False, walked), q[2:3], organs[2:3])
    expected[2] = organs[2]
    np.testing.assert_array_equal(refined, expected)
    assert (refined != walked).any()
    other = dict(support_image=image[..., ::-1].copy(), normalized=True)
    np.testing.assert_array_equal(propagate(model, image, ann, on.but(appearance=0.0), **other).label,
                                  propagate(model, image, ann, off.but(appearance=0.0), **other).label)
