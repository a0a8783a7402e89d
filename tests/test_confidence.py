"""Per-slice confidence, the slice to annotate next, several annotated slices, the walk cache (stub model, CPU)."""
from __future__ import annotations

import numpy as np

from lib.pipeline import PropagateOptions
from lib.pipeline import propagate as run_propagate
from lib.pipeline.confidence import certainty, cumulative, expected_gain, next_slice, next_slices, slice_confidence
from tests.test_pipeline import StubModel


def _run(model, image, ann, **kw):
    options = PropagateOptions(threshold=0.5, chain=True, gate=False, largest=False, walker="network")   # the stub's steps
    return run_propagate(model, image, ann, options, normalized=True, **kw)


def test_cumulative_multiplies_agreements_outward_from_each_annotated_slice():
    agree = np.array([0.5, 0.9, 1.0, 0.8, 0.5, 1.0, np.nan])
    source = np.array([2, 2, 2, 2, 5, 5, 5])
    out = cumulative(agree, source)
    np.testing.assert_allclose(out[:6], [0.45, 0.9, 1.0, 0.8, 0.5, 1.0])
    assert np.isnan(out[6])                                # not reached


def test_certainty_and_next_slice_skip_annotated_and_absent_slices():
    probs = np.zeros((4, 4, 4), np.float32)
    probs[1, :2] = 0.6                                     # 8 pixels, barely sure
    probs[2, :1] = 1.0                                     # 4 pixels, sure
    mask = probs > 0.5
    c = certainty(probs, mask)
    assert np.isnan(c[0]) and np.isnan(c[3]) and np.isclose(c[1], 0.2) and c[2] == 1.0
    conf = slice_confidence(probs, mask, None, np.array([-1, -1, -1, -1]))
    assert next_slice(conf, mask, []) == 1 and next_slice(conf, mask, [1]) is None   # slice 2 is certain


def test_next_slices_rank_by_expected_wrong_voxels_and_skip_slices_where_the_organ_shrank():
    area = np.array([0, 60, 100, 60, 10, 30])               # annotated slice 2; slices 4, 5 shrank below half
    mask = np.zeros((6, 20, 20), bool)
    for z, a in enumerate(area):
        mask[z].flat[:a] = True
    conf = np.array([np.nan, 0.5, 1.0, 0.9, 0.0, 0.2])
    source = np.array([2, 2, 2, 2, 2, 2])
    assert next_slices(conf, mask, [2], source) == [1, 3]    # 30 and 6 expected wrong voxels; 4 and 5 too small
    assert next_slices(conf, mask, [2], None, presence=0.0) == [1, 5, 4]


def _drifting_case(z_n=12):
    """An organ whose square moves 1 px per slice; the stub copies its support, so chained results lag."""
    image = np.random.default_rng(0).random((24, 24, z_n)).astype(np.float32)
    truth = np.zeros((24, 24, z_n), np.uint8)
    for z in range(z_n):
        truth[4 + z // 2:14 + z // 2, 6:16, z] = 1
    return image, truth


class OddStub(StubModel):
    """The stub with some encoded supports (by encoding order) replaced by a constant prediction."""

    def __init__(self, overrides: dict[int, float], size=24):
        super().__init__(size)
        self.overrides = overrides

    def encode_supports(self, images, masks):
        out = super().encode_supports(images, masks)
        first = len(self.encoded) - len(masks)
        for j in range(len(masks)):
            if first + j in self.overrides:
                out[j] = self.overrides[first + j]
        return out


def test_confidence_falls_where_a_step_disagrees_with_its_support_and_names_that_slice():
    """Annotated slice 3 of 12: steps go 4, 2, 5, 1, 6, 0, 7, 8, ... (lockstep); the 8th support encoded
    (the step to slice 8) predicts the whole slice, unlike the support it was given."""
    image, truth = _drifting_case()
    ann = np.zeros_like(truth)
    ann[..., 3] = truth[..., 3]
    res = _run(OddStub({7: 1.0}), image, ann)
    conf = res.confidence[1]
    assert all(conf[z] == 1.0 for z in range(8))                    # copies agree with their support
    np.testing.assert_allclose(conf[8:], 2 * 100 / (100 + 24 * 24), rtol=1e-5)   # carried on from slice 8
    # annotating 11 re-walks 10, 9, 8 with good steps; annotating 8 would also serve 6 and 7 across the bad step
    assert res.next_slices[1] == [11, 9, 10]
    assert 0 < res.uncertainty < 1


def test_a_second_and_third_annotated_slice_refine_between_and_around_them():
    image, truth = _drifting_case()
    dice = lambda a: 2 * ((a > 0) & (truth > 0)).sum() / ((a > 0).sum() + (truth > 0).sum())  # noqa: E731
    scores, previous = [], None
    for slices in ([5], [5, 10], [1, 5, 10], [1, 5, 6, 10]):   # neighbours annotated too
        ann = np.zeros_like(truth)
        ann[..., slices] = truth[..., slices]
        res = _run(StubModel(size=24), image, ann)
        assert all(np.array_equal(res.label[..., z], truth[..., z]) for z in slices)   # annotated: kept exactly
        assert res.support == {1: slices}
        for z in range(truth.shape[-1]):                     # each slice: a copy of its nearest annotated slice
            near = slices[int(np.argmin([abs(z - s) for s in slices]))]
            assert np.array_equal(res.label[..., z], truth[..., near]), (slices, z)
        scores.append(dice(res.label))
        previous = res
    assert scores[0] < scores[1] < scores[2] <= scores[3]
    assert previous.next_slice[1] not in (1, 5, 6, 10)


def test_a_walk_that_ends_between_two_annotated_slices_is_bridged_from_the_other_one():
    image, truth = _drifting_case()
    ann = np.zeros_like(truth)
    ann[..., [2, 9]] = truth[..., [2, 9]]
    res = _run(OddStub({0: 0.0}), image, ann)        # the first step (2 -> 3) finds nothing: that walk ends
    filled = [z for z in range(3, 9) if res.label[..., z].any()]
    assert filled == list(range(3, 9))                     # nothing left empty between the two annotations


def test_walks_cache_gives_the_same_result_with_fewer_steps():
    image, truth = _drifting_case()
    cache = {}
    for slices in ([5], [5, 10]):
        ann = np.zeros_like(truth)
        ann[..., slices] = truth[..., slices]
        fresh_model, cached_model = StubModel(size=24), StubModel(size=24)
        fresh = _run(fresh_model, image, ann)
        cached = _run(cached_model, image, ann, walks_cache=cache)
        assert np.array_equal(fresh.label, cached.label)
        np.testing.assert_allclose(fresh.confidence[1], cached.confidence[1])
    assert len(cached_model.encoded) < len(fresh_model.encoded)   # slice 5's walk was reused


def test_expected_gain_prefers_the_middle_of_a_long_uncertain_run_over_its_far_end():
    conf = np.array([1.0, 0.9, 0.8, 0.7, 0.6, 0.5])           # one walk from annotated slice 0
    area = np.full(6, 10.0)
    source = np.zeros(6, dtype=np.int64)
    gain = expected_gain(conf, area, source)
    # slice 3: itself 3, beyond it 10 (0.6 / 0.7 - 0.6) + 10 (0.5 / 0.7 - 0.5), slice 2 (nearer 3 than 0) 10 (0.7 / 0.8 - 0.8)
    assert np.isclose(gain[3], 3 + 10 * (0.6 / 0.7 - 0.6) + 10 * (0.5 / 0.7 - 0.5) + 10 * (0.7 / 0.8 - 0.8))
    # slice 5: itself 5, and slices 4 and 3, nearer 5 than 0, walked back from 5
    assert np.isclose(gain[5], 5 + 10 * (0.5 / 0.6 - 0.6) + 10 * (0.5 / 0.7 - 0.7)) and gain[0] == 0.0
    mask = np.zeros((6, 4, 4), bool)
    mask[:, :2, :] = True                                    # 8 pixels on every slice
    best = next_slices(conf, mask, [0], source)
    assert best == [4, 3, 5] and int(np.argmax((1 - conf) * 8)) == 5   # the most wrong voxels: the far end


def test_no_slice_is_suggested_beyond_an_annotated_organ_end():
    area = np.array([40, 40, 10, 60, 100, 60, 50])           # annotated 2 (small: the organ's end) and 4
    mask = np.zeros((7, 20, 20), bool)
    for z, a in enumerate(area):
        mask[z].flat[:a] = True
    conf = np.array([0.1, 0.2, 1.0, 0.8, 1.0, 0.8, 0.5])
    source = np.array([2, 2, 2, 4, 4, 4, 4])
    assert next_slices(conf, mask, [2, 4], source) == [6, 5, 3]
    assert next_slices(conf, mask, [2, 4], source, end=0.0)[0] in (0, 1)   # without the rule: past the end
