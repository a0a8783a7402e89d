"""The segmentation pipeline (lib.pipeline): step, chained walks, propagation; stub and tiny models, CPU."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lib.model import build_model
from lib.pipeline import AnnotationError, PropagateOptions
from lib.pipeline import propagate as run_propagate
from lib.pipeline.propagate import annotated_slices, check_annotation, check_volume, nearest_slices
from lib.pipeline.step import Step
from lib.pipeline.walk import ChainWalk, chain


class StubModel:
    """Stands in for SD-FSMIS: the 'prediction' is the support mask (or a constant), so results are exact."""

    def __init__(self, size=16, constant=None):
        self.config = SimpleNamespace(image_size=size, threshold=0.5, align_support="none", edit_prior=False)
        self.constant = constant or []   # per support encoded: a constant probability instead of the mask
        self.encoded, self.batches, self.distinct = [], [], []   # distinct: query slices encoded per batch

    def encode_supports(self, images, masks):
        assert images.shape == masks.shape and images.shape[1:] == (1, self.config.image_size, self.config.image_size)
        out = []
        for m in masks:
            i = len(self.encoded)
            self.encoded.append(m.clone())
            out.append(torch.full_like(m, self.constant[i]) if i < len(self.constant) else m.clone())
        return torch.stack(out)

    def encode_support(self, images, masks):
        assert images.shape[0] == 1
        return self.encode_supports(images, masks)

    def predict(self, queries, cache, index=None):
        n = queries.shape[0] if index is None else len(index)      # index: queries of fewer distinct slices
        self.batches.append(n)
        self.distinct.append(queries.shape[0])
        return cache.expand(n, -1, -1, -1).clone() if cache.shape[0] == 1 else cache.clone()


def propagate(model, image, ann, batch_size=8, merge="probability", chain=False, gate=False, largest=False,
              appearance=0.0, **kw):
    """The pipeline with the old test defaults (per slice, no gate, every component, no appearance fusion:
    tests/test_appearance.py has that; the network walks: tests/test_register_step.py has registration)."""
    options = PropagateOptions(threshold=0.5, batch_size=batch_size, merge=merge, chain=chain, gate=gate,
                               largest=largest, appearance=appearance, walker="network")
    return run_propagate(model, image, ann, options, **kw)


def chain_segment(model, slices, start, start_mask, align=None, verify=None):
    """One walk from `start` with the network step (as the app walks each annotated slice)."""
    return chain(Step(model, 0.5, align), slices, [ChainWalk(start, start_mask, verify)])[0]


def _squares(shape=(16, 16, 8)):
    """Organ 1 annotated on z=1 (top-left square) and z=6 (bottom-right square)."""
    ann = np.zeros(shape, np.uint8)
    ann[2:6, 2:6, 1] = 1
    ann[10:14, 10:14, 6] = 1
    return ann


# ---- slice bookkeeping -------------------------------------------------------------------------


def test_nearest_slices_same_volume_and_across_volumes():
    assert nearest_slices([0, 2, 3, 4, 5, 7], [1, 6], 8).tolist() == [1, 1, 1, 6, 6, 6]
    assert nearest_slices([0, 5, 9], [2], 10).tolist() == [2, 2, 2]
    # another volume: relative positions (query 0..9 against support slices 0 and 19 of 20)
    assert nearest_slices([0, 4, 5, 9], [0, 19], 10, 20).tolist() == [0, 0, 19, 19]
    with pytest.raises(AnnotationError):
        nearest_slices([0], [], 4)


def test_each_query_slice_uses_the_nearest_annotated_slice():
    ann = _squares()
    model = StubModel()
    res = propagate(model, np.random.default_rng(0).random(ann.shape), ann, batch_size=2)
    top_left, bottom_right = ann[..., 1], ann[..., 6]
    for z in (0, 2, 3):
        assert np.array_equal(res.label[..., z], top_left), z
    for z in (4, 5, 7):
        assert np.array_equal(res.label[..., z], bottom_right), z
    assert res.support == {1: [1, 6]} and res.copied == [1, 6]
    assert len(model.encoded) == 2                    # one encoding per organ and support slice
    assert max(model.batches) <= 2 and sum(model.batches) == 6


def test_annotated_slices_are_copied_unchanged():
    ann = _squares()
    ann[0:2, 0:2, 1] = 3                              # a second organ on slice 1 only
    res = propagate(StubModel(constant=[0.99, 0.99]), np.ones(ann.shape), ann)   # predicts everything as organ
    assert np.array_equal(res.label[..., 1], ann[..., 1])     # both organs annotated there: copied
    # slice 6 holds organ 1's annotation only: kept exactly, and organ 3 is segmented around it
    on6 = ann[..., 6] > 0
    assert np.array_equal(res.label[..., 6][on6], ann[..., 6][on6]) and (res.label[..., 6] == 3).any()
    assert res.label.dtype == np.uint8
    assert set(np.unique(res.label[..., 0]).tolist()) <= {1, 3}


def test_multi_organ_merge_rules():
    ann = np.zeros((16, 16, 4), np.uint8)
    ann[2:6, 2:6, 0] = 2
    ann[8:12, 8:12, 0] = 5
    image = np.random.default_rng(1).random(ann.shape)
    # organ 2 predicts 0.9 everywhere, organ 5 predicts 0.7 everywhere: both cover every voxel
    by_prob = propagate(StubModel(constant=[0.9, 0.7]), image, ann, merge="probability")
    by_order = propagate(StubModel(constant=[0.9, 0.7]), image, ann, merge="order")
    assert by_prob.organs == [2, 5]
    assert (by_prob.label[..., 1:] == 2).all()        # higher probability wins
    assert (by_order.label[..., 1:] == 5).all()       # later organ value wins
    tie = propagate(StubModel(constant=[0.8, 0.8]), image, ann, merge="probability")
    assert (tie.label[..., 1:] == 5).all()            # equal probability: the later organ
    none = propagate(StubModel(constant=[0.2, 0.3]), image, ann)
    assert (none.label[..., 1:] == 0).all()           # below threshold: background
    for res in (by_prob, by_order, tie, none):
        assert np.array_equal(res.label[..., 0], ann[..., 0])


def test_cross_volume_support_predicts_every_slice():
    ann = _squares((16, 16, 16))                      # support volume: 16 slices, annotated 1 and 6
    res = propagate(StubModel(), np.random.default_rng(2).random((16, 16, 8)), ann,
                    support_image=np.random.default_rng(3).random((16, 16, 16)))
    assert res.copied == [] and res.label.shape == (16, 16, 8)
    # relative position: query z=0..3 nearer support z=1 (or 6 at about 0.4), z=7 nearer 6
    assert np.array_equal(res.label[..., 0], ann[..., 1])
    assert np.array_equal(res.label[..., 7], ann[..., 6])


def test_tiny_model_end_to_end_resizes_and_batches():
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    ann = np.zeros((40, 48, 5), np.uint8)
    ann[10:25, 10:30, 2] = 1
    ann[28:36, 30:44, 2] = 4
    image = np.random.default_rng(0).normal(100, 20, ann.shape).astype(np.float32)
    res = propagate(model, image, ann, batch_size=3)
    assert res.label.shape == ann.shape and res.label.dtype == np.uint8
    assert np.array_equal(res.label[..., 2], ann[..., 2])
    assert set(np.unique(res.label).tolist()) <= {0, 1, 4}
    assert res.forward_passes == 2 * 2                # 2 organs x ceil(4 query slices / 3)


# ---- validation --------------------------------------------------------------------------------
@pytest.mark.parametrize("label, words", [
    (np.zeros((8, 8, 4)), "empty"),
    (np.ones((8, 8, 3)), "differs from the image shape"),
    (np.full((8, 8, 4), 0.5), "non-integer"),
    (np.full((8, 8, 4), -1), "negative"),
    (np.full((8, 8, 4), 300), "above 255"),
    (np.full((8, 8, 4), np.nan), "non-integer"),
])
def test_bad_annotations_are_rejected(label, words):
    with pytest.raises(AnnotationError, match=words):
        check_annotation(label, (8, 8, 4))


def test_good_annotation_and_2d_images():
    assert check_annotation(np.full((8, 8, 4), 2.0), (8, 8, 4)).dtype == np.uint8
    assert annotated_slices(np.pad(np.ones((1, 2, 2)), ((2, 1), (0, 0), (0, 0)))).tolist() == [2]   # (Z, H, W)
    for shape in [(8, 8), (8, 8, 1), (8, 8, 1, 1)]:
        with pytest.raises(AnnotationError, match="3D volume"):
            check_volume(np.zeros(shape))


# ---- chained propagation -----------------------------------------------------------------------
def test_chain_walks_outward_and_stops_where_the_organ_ends():
    ann = np.zeros((8, 16, 16), np.float32)              # (N, H, W) slices
    ann[3, 4:10, 5:12] = 1
    stub = StubModel()
    masks, probs = chain_segment(stub, np.random.default_rng(0).random((8, 16, 16)), 3, ann[3])
    assert masks.shape == (8, 16, 16) and masks.all(axis=0).sum() == 6 * 7     # the square carried to every slice
    assert len(stub.encoded) == 7                                                 # one support per step
    # a step predicting nothing ends that direction: upward (first walk) stops at once
    stub = StubModel(constant=[0.0])
    masks, _ = chain_segment(stub, np.zeros((8, 16, 16)), 3, ann[3])
    assert [bool(m.any()) for m in masks] == [True, True, True, True, False, False, False, False]
    assert len(stub.encoded) == 1 + 3
    with pytest.raises(ValueError, match="empty"):
        chain_segment(StubModel(), np.zeros((8, 16, 16)), 3, np.zeros((16, 16)))


def test_chain_hooks_align_each_support_and_verify_each_step():
    """align warps the previous slice's mask before the network; verify checks every result before it is
    carried on, and a result it empties ends that direction."""
    ann = np.zeros((16, 16), np.float32)
    ann[4:10, 5:12] = 1
    seen, checked = [], []

    def align(query, image, mask):                       # moves the organ one pixel down per step
        seen.append((query.shape, image.shape, mask.dtype))
        return image, np.roll(mask, 1, axis=0)

    def verify(z, mask):
        checked.append(z)
        return mask if z != 1 else np.zeros_like(mask)  # slice 1: "the organ ended"

    masks, probs = chain_segment(StubModel(), np.random.default_rng(0).random((8, 16, 16)), 3, ann,
                                 align=align, verify=verify)
    assert seen == [((16, 16), (16, 16), np.dtype(bool))] * 6      # 4 steps up (4..7), 2 down (2, 1)
    assert checked == [4, 2, 5, 1, 6, 7]                  # both directions in lockstep
    for z in range(4, 8):
        assert np.array_equal(masks[z], np.roll(ann > 0, z - 3, axis=0))
    assert masks[2].any() and not masks[1].any() and not masks[0].any()
    assert np.array_equal(masks, probs > 0.5)


def test_propagate_chain_registers_each_step_for_an_aligned_model():
    """A model trained with registration-aligned supports (config align_support) gets them in the app's
    propagation too: with the stub (prediction = the support mask it is given) the chain then follows
    an organ that drifts 3 px per slice, where the unaligned chain copies the annotation."""
    yy, xx = np.mgrid[0:64, 0:64]
    blobs = [np.exp(-(((yy - 32) / 8.0) ** 2 + ((xx - 14 - 3 * z) / 7.0) ** 2)) for z in range(9)]
    image = np.stack([0.2 + 0.7 * b for b in blobs], axis=-1).astype(np.float32)
    truth = np.stack([b > 0.4 for b in blobs], axis=-1)
    ann = np.zeros(image.shape, np.uint8)
    ann[..., 4] = truth[..., 4]
    dice = lambda a, z: 2 * (a & truth[..., z]).sum() / (a.sum() + truth[..., z].sum())  # noqa: E731
    aligned = StubModel(size=64)
    aligned.config.align_support = "registration"
    res = propagate(aligned, image, ann, chain=True, gate=False, normalized=True)
    plain = propagate(StubModel(size=64), image, ann, chain=True, gate=False, normalized=True)
    assert min(dice(res.label[..., z] > 0, z) for z in (0, 8)) > 0.7
    assert max(dice(plain.label[..., z] > 0, z) for z in (0, 8)) < 0.3


def test_propagate_chain_across_volumes_seeds_at_the_relative_position_then_walks():
    """support_image + chain: the query slice at the support slice's relative position is segmented from
    the other volume once, and the walk carries that result through the query volume."""
    support = np.random.default_rng(2).random((16, 16, 8)).astype(np.float32)
    ann = np.zeros((16, 16, 8), np.uint8)
    ann[3:9, 4:12, 2] = 1                                 # relative position 2/7 = 0.29 -> query slice 4 of 0..15
    stub = StubModel()
    res = propagate(stub, np.random.default_rng(3).random((16, 16, 16)), ann, support_image=support, chain=True,
                    gate=False)
    assert len(stub.encoded) == 1 + 15 and stub.batches[0] == 1             # the seed alone, then 15 walk steps
    assert all(np.array_equal(res.label[..., z], ann[..., 2]) for z in range(16))
    stub = StubModel()
    propagate(stub, np.random.default_rng(3).random((16, 16, 16)), ann, support_image=support, chain=False,
              gate=False)
    assert len(stub.encoded) == 1 and sum(stub.batches) == 16                 # one support, all slices batched


def test_propagate_chain_option_uses_neighbours_as_supports():
    ann = _squares((16, 16, 8))
    stub = StubModel()
    res = propagate(stub, np.random.default_rng(1).random((16, 16, 8)), ann, chain=True)
    # slices 0, 2, 3 go to annotated slice 1 (walks 1->2->3 and 1->0), 4, 5, 7 to slice 6 (6->7, 6->5->4)
    assert len(stub.encoded) == 3 + 3
    assert np.array_equal(res.label[..., 3], ann[..., 1]) and np.array_equal(res.label[..., 4], ann[..., 6])
    assert np.array_equal(res.label[..., 1], ann[..., 1])


def test_propagate_gate_option_removes_masks_off_the_organ():
    ann = np.zeros((16, 16, 4), np.uint8)
    ann[4:12, 4:12, 1] = 1
    image = np.full((16, 16, 4), 0.2, np.float32)
    image[4:12, 4:12, :3] = 0.9                          # the organ is in slices 0-2, gone from slice 3
    plain = propagate(StubModel(), image, ann, normalized=True)
    gated = propagate(StubModel(), image, ann, normalized=True, gate=True)
    assert plain.label[..., 3].any() and not gated.label[..., 3].any()       # the stub copies; the gate drops it
    across = propagate(StubModel(), image, ann, support_image=image, normalized=True, gate=True)
    assert across.label[..., 3].any()                     # another volume: the gate is not applied
    lost = (plain.label[..., :3] > 0) & (gated.label[..., :3] == 0)
    assert lost.sum() == 2 * 4 and not (gated.label[..., :3] > plain.label[..., :3]).any()   # corners cut by the opening; slice 1 is the annotation
