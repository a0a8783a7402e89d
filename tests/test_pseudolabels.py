"""Body mask, 3D supervoxels and their content-keyed cache (DESIGN §3)."""
import numpy as np
import pytest

from lib.data.pseudolabels import body_mask, supervoxels
from lib.data.supervoxel_cache import load_or_compute
from tests.synthetic_volumes import phantom

SPACING = (1.5, 1.5, 4.0)


@pytest.fixture(scope="module")
def volume():
    return phantom()


def test_body_mask_is_the_body_without_the_outside_speck(volume):
    image, body, _ = volume
    mask = body_mask(image)
    assert mask.dtype == bool and mask.shape == image.shape
    iou = (mask & body).sum() / (mask | body).sum()
    assert iou > 0.97
    assert not mask[2:4, 2:4, :].any()  # largest component only


def test_body_mask_fills_holes():
    image, body, _ = phantom()
    image[40:50, 40:50, :] = 0  # a dark hole inside the body
    assert body_mask(image)[45, 45, :].all()


def test_supervoxels_cover_the_body_and_respect_the_minimum_size(volume):
    image, _, _ = volume
    body = body_mask(image)
    sv = supervoxels(image, SPACING, body=body, min_size=5000, segment_size=12000)
    assert sv.dtype == np.uint16 and sv.shape == image.shape
    assert not sv[~body].any(), "supervoxels outside the body"
    assert (sv[body] > 0).all(), "body voxels without a supervoxel"
    sizes = np.bincount(sv.ravel())[1:]
    assert len(sizes) >= 3 and sizes.min() >= 5000
    assert np.array_equal(sv, supervoxels(image, SPACING, body=body, min_size=5000, segment_size=12000))


def test_cache_hit_on_second_call_and_miss_on_changed_image(volume, tmp_path):
    image, _, _ = volume
    first = load_or_compute(image, SPACING, cache_dir=tmp_path)
    second = load_or_compute(image, SPACING, cache_dir=tmp_path)
    assert not first.from_cache and second.from_cache
    assert np.array_equal(first.supervoxels, second.supervoxels) and np.array_equal(first.body, second.body)
    changed = image.copy()
    changed[50, 50, 5] += 1
    assert not load_or_compute(changed, SPACING, cache_dir=tmp_path).from_cache
    assert len(list(tmp_path.glob("*.npz"))) == 2 and not list(tmp_path.glob("*.tmp*"))


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="3D"):
        body_mask(np.zeros((10, 10)))
    with pytest.raises(ValueError, match="spacing"):
        supervoxels(np.zeros((20, 20, 4)), (1.0, -1.0, 1.0))
