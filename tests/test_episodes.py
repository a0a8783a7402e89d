"""Episode sampling (ADNet/RPT rule), Setting 2 exclusion and the seeded augmentation."""
import numpy as np
import pytest
from skimage.measure import label

from lib.data.episodes import EpisodeSampler, excluded_slices
from lib.transforms.augment import EpisodeAugment, resize_episode
from tests.synthetic_volumes import phantom


def _sv_volume():
    """Image in [0, 1] and hand-made supervoxels: 4 quadrant columns, each spanning all slices."""
    image, body, organs = phantom((64, 64, 10))
    sv = np.zeros(image.shape, np.uint16)
    sv[:32, :32], sv[:32, 32:], sv[32:, :32], sv[32:, 32:] = 1, 2, 3, 4
    sv[:, :, 0][:32, :32] = 0          # supervoxel 1 absent from slice 0
    sv[20:32, 20:32, 5] = 0            # ... and too small in slice 5 (1024 - 144 = 880 px: still >= 200)
    sv[:32, :32, 7] = 0
    sv[0:10, 0:10, 7] = 1              # 100 px in slice 7: below the 200 px minimum
    return (image / image.max()).astype(np.float32), sv, organs


def test_episodes_are_adjacent_slices_of_one_supervoxel_with_enough_area():
    image, sv, _ = _sv_volume()
    sampler = EpisodeSampler([(image, sv)], seed=1)
    for _ in range(200):
        ep = sampler.sample()
        zs, zq = ep["slices"]
        k = ep["supervoxel"]
        assert abs(zs - zq) == 1
        assert np.array_equal(ep["support_mask"], (sv[:, :, zs] == k).astype(np.float32))
        assert np.array_equal(ep["query_mask"], (sv[:, :, zq] == k).astype(np.float32))
        assert ep["support_mask"].sum() >= 200 and ep["query_mask"].sum() >= 200
        assert np.array_equal(ep["support_image"], image[:, :, zs])
        if k == 1:
            assert {zs, zq}.isdisjoint({0, 7})


def test_sampler_is_deterministic_for_a_seed():
    image, sv, _ = _sv_volume()
    draw = lambda seed: [EpisodeSampler([(image, sv)], seed=seed).sample()["slices"] for _ in range(1)] + [
        (e["supervoxel"], e["slices"]) for e in [s.sample() for s in [EpisodeSampler([(image, sv)], seed=seed)]
                                                 for _ in range(20)]]
    assert draw(3) == draw(3)
    assert draw(3) != draw(4)


@pytest.mark.parametrize("rule", ["strict", "rpt"])
def test_setting2_never_yields_an_excluded_slice(rule):
    image, sv, organs = _sv_volume()  # organ 1: slices 3-9, organ 2: slices 6-9 (of 10)
    excluded = excluded_slices(organs, [1, 2], rule)
    expected = np.zeros(10, bool)
    expected[3:10] = True if rule == "strict" else False
    if rule == "rpt":
        expected[6:10] = True
    assert np.array_equal(excluded, expected)
    sampler = EpisodeSampler([(image, sv)], seed=0, labels=[organs], exclude_labels=[1, 2], setting2_rule=rule)
    for _ in range(200):
        assert not excluded[list(sampler.sample()["slices"])].any()


def test_setting2_needs_labels_and_a_known_rule():
    image, sv, organs = _sv_volume()
    with pytest.raises(ValueError, match="labels"):
        EpisodeSampler([(image, sv)], exclude_labels=[1])
    with pytest.raises(ValueError, match="strict"):
        EpisodeSampler([(image, sv)], labels=[organs], exclude_labels=[1], setting2_rule="any")


def test_augmentation_is_seeded_and_keeps_binary_masks():
    image, sv, _ = _sv_volume()
    ep = resize_episode(EpisodeSampler([(image, sv)], seed=0).sample(), 48)
    assert ep["query_image"].shape == (48, 48)
    aug = EpisodeAugment(48, seed=5)
    a = aug(ep)
    aug.set_random_state(5)
    b = aug(ep)
    changed = False
    for key in ep:
        if key.endswith("mask"):
            assert set(np.unique(a[key])) <= {0.0, 1.0}
        if key.endswith(("image", "mask")):
            assert np.array_equal(a[key], b[key])
            changed |= not np.array_equal(a[key], ep[key])
            assert a[key].min() >= 0 and a[key].max() <= 1
    assert changed


def test_merge_grows_connected_multi_supervoxel_regions():
    from lib.data.episodes import grow_region

    grid = np.repeat(np.repeat(np.arange(1, 17).reshape(4, 4), 8, 0), 8, 1)   # 4x4 blocks of 8x8 px
    grid[:8, :8] = 0                                                           # background block
    rng = np.random.default_rng(0)
    assert grow_region(grid, 6, 0, rng) == [6]
    for _ in range(20):
        region = grow_region(grid, 6, 5, rng)
        assert len(region) == 6 and len(set(region)) == 6 and 0 not in region
        inside = np.isin(grid, region)
        assert label(inside, connectivity=1).max() == 1                                          # one connected piece
    image, sv, _ = _sv_volume()
    sampler = EpisodeSampler([(image, sv)], seed=3, merge=3)
    sizes = set()
    for _ in range(60):
        ep = sampler.sample()
        zs, zq = ep["slices"]
        assert ep["region"][0] == ep["supervoxel"]
        assert np.array_equal(ep["support_mask"], np.isin(sv[:, :, zs], ep["region"]).astype(np.float32))
        assert np.array_equal(ep["query_mask"], np.isin(sv[:, :, zq], ep["region"]).astype(np.float32))
        sizes.add(len(ep["region"]))
    assert 1 in sizes and max(sizes) > 1
    with pytest.raises(ValueError, match="merge"):
        EpisodeSampler([(image, sv)], merge=-1)


def test_augmentation_strength_scales_the_geometric_ranges():
    weak, strong = EpisodeAugment(64, seed=0), EpisodeAugment(64, seed=0, strength=2.0)
    w, s = weak.geometric.rand_affine_grid, strong.geometric.rand_affine_grid
    assert w.translate_range == (1.25, 1.25) and s.translate_range == (2.5, 2.5)      # 5 px at 256 -> 64 px
    assert s.rotate_range[0] == pytest.approx(2 * w.rotate_range[0])
    assert np.allclose(s.scale_range, 2 * np.asarray(w.scale_range))
    with pytest.raises(ValueError, match="strength"):
        EpisodeAugment(64, strength=-1)


def test_vanish_episodes_pair_a_region_with_the_slice_where_it_ends():
    from lib.data.episodes import ending_pairs

    image, sv, _ = _sv_volume()
    # supervoxel 1: absent from slice 0 (ends there); 100 px in slice 7 is neither >= 200 nor < 50
    assert ending_pairs(sv).tolist() == [[1, 1, 0]]
    sv2 = sv.copy()
    sv2[:, :, 9][sv2[:, :, 9] == 4] = 0
    sv2[40, 40, 9] = 4                                   # 1 px left of supervoxel 4 on slice 9: ends
    assert ending_pairs(sv2).tolist() == [[1, 1, 0], [4, 8, 9]]
    excluded = np.zeros(10, bool)
    excluded[0] = True
    assert ending_pairs(sv2, excluded=excluded).tolist() == [[4, 8, 9]]
    sampler = EpisodeSampler([(image, sv2)], seed=2, vanish=0.5)
    kinds = set()
    for _ in range(40):
        ep = sampler.sample()
        zs, zq = ep["slices"]
        ending = ep["query_mask"].sum() * 4 < 200
        kinds.add(ending)
        if ending:
            assert (ep["supervoxel"], zs, zq) in {(1, 1, 0), (4, 8, 9)} and ep["support_mask"].sum() >= 200
    assert kinds == {True, False}
    with pytest.raises(ValueError, match="vanish"):
        EpisodeSampler([(image, sv)], vanish=1.0)


def test_gap_episodes_reach_distant_slices_only_through_the_supervoxel():
    image, sv, _ = _sv_volume()
    present = (sv[..., None] == np.arange(1, 5)).sum(axis=(0, 1)) >= 200        # (Z, 4) id covers >= 200 px
    sampler = EpisodeSampler([(image, sv)], seed=4, gap=4)
    gaps = set()
    for _ in range(300):
        ep = sampler.sample()
        zs, zq = ep["slices"]
        k = ep["supervoxel"]
        gaps.add(abs(zq - zs))
        assert 1 <= abs(zq - zs) <= 4
        lo, hi = min(zs, zq), max(zs, zq)
        assert present[lo:hi + 1, k - 1].all()                 # no slice in between lacks the supervoxel
        assert np.array_equal(ep["query_mask"], (sv[:, :, zq] == k).astype(np.float32))
        if k == 1:
            assert lo > 0 and not lo < 7 < hi                  # never across slice 0 or slice 7
    assert gaps == {1, 2, 3, 4}
    adjacent = EpisodeSampler([(image, sv)], seed=4)            # gap 1 draws exactly the old episodes
    assert all(abs(np.subtract(*adjacent.sample()["slices"])) == 1 for _ in range(50))
    with pytest.raises(ValueError, match="gap"):
        EpisodeSampler([(image, sv)], gap=0)


def test_lru_keeps_the_most_recently_used():
    """lib.data.lru.LRU (the volume caches of sampling and evaluation): a hit is not recomputed and counts as
    a use; beyond `size` the least recently used value goes."""
    from lib.data.lru import LRU

    made = []
    cache = LRU(2)
    get = lambda k: cache.get(k, lambda: made.append(k) or k * 10)  # noqa: E731
    assert [get(1), get(2), get(1), get(3)] == [10, 20, 10, 30]
    assert made == [1, 2, 3] and 1 in cache and 2 not in cache and len(cache) == 2
    assert get(2) == 20 and made == [1, 2, 3, 2] and 1 not in cache and 3 in cache
