"""Chained walks in lockstep (lib.pipeline.walk.chain): every walk of a volume and both directions of
each advance together, one network batch per round, with the results of separate walks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lib.pipeline.step import Step, distinct_rows
from lib.pipeline.walk import ChainWalk, chain
from tests.test_pipeline import StubModel, chain_segment, propagate


def chain_segment_many(model, slices, walks, align=None, batch_size: int = 8):
    return chain(Step(model, 0.5, align, batch_size), slices, walks)


def _square(shape, y, x, r=3):
    m = np.zeros(shape, bool)
    m[y - r:y + r, x - r:x + r] = True
    return m


def _shift(query, image, mask):                 # an `align` hook: the organ moves one pixel right per step
    return image, np.roll(mask, 1, axis=1)


def _stop_at(z_stop):                            # a `verify` hook: the organ ends on slice z_stop
    return lambda z, mask: np.zeros_like(mask) if z == z_stop else mask


def test_many_walks_equal_separate_walks_in_shared_batches():
    rng = np.random.default_rng(0)
    slices = rng.random((10, 24, 24)).astype(np.float32)
    walks = [ChainWalk(4, _square((24, 24), 6, 6), _stop_at(1)),
             ChainWalk(4, _square((24, 24), 16, 8), None, lo=2, hi=7),
             ChainWalk(6, _square((24, 24), 12, 14), _stop_at(8))]
    stub = StubModel(size=24)
    many = list(chain_segment_many(stub, slices, walks, align=_shift))
    # round 1: 2 directions x 3 walks in one batch; later rounds shrink as walks end
    assert stub.batches[0] == 6 and max(stub.batches) == 6 and len(stub.batches) < sum(len(m[0]) for m in many)
    for wk, (masks, probs) in zip(walks, many):
        hi = len(slices) - 1 if wk.hi is None else wk.hi
        sub = slices[wk.lo:hi + 1]
        verify = None if wk.verify is None else (lambda z, m, f=wk.verify, lo=wk.lo: f(z + lo, m))
        ref_masks, ref_probs = chain_segment(StubModel(size=24), sub, wk.start - wk.lo, wk.mask, align=_shift,
                                             verify=verify)
        assert np.array_equal(masks[wk.lo:hi + 1], ref_masks) and np.array_equal(probs[wk.lo:hi + 1], ref_probs)
        assert not masks[:wk.lo].any() and not masks[hi + 1:].any()
    assert not many[0][0][1].any() and many[0][0][2].any()           # walk 0 ended on slice 1
    assert many[1][0][2:8].any(axis=(1, 2)).all()                     # walk 1 covers its range 2..7


def test_batch_size_splits_a_round_without_changing_results():
    slices = np.random.default_rng(1).random((8, 16, 16)).astype(np.float32)
    walks = [ChainWalk(3, _square((16, 16), 5, 5)), ChainWalk(4, _square((16, 16), 10, 10))]
    small, big = StubModel(), StubModel()
    a = list(chain_segment_many(small, slices, walks, batch_size=1))
    b = list(chain_segment_many(big, slices, walks, batch_size=8))
    assert set(small.batches) == {1} and max(big.batches) == 4
    for (ma, pa), (mb, pb) in zip(a, b):
        assert np.array_equal(ma, mb) and np.array_equal(pa, pb)
    with pytest.raises(ValueError, match="outside"):
        chain_segment_many(StubModel(), slices, [ChainWalk(1, walks[0].mask, lo=2, hi=5)])


def test_propagate_walks_all_organs_at_once_with_the_per_organ_results():
    ann = np.zeros((16, 16, 8), np.uint8)
    ann[2:6, 2:6, 3] = 1
    ann[9:14, 8:13, 3] = 2
    image = np.random.default_rng(2).random(ann.shape).astype(np.float32)
    stub = StubModel()
    both = propagate(stub, image, ann, chain=True, gate=False, normalized=True)
    assert stub.batches[0] == 4                                      # 2 organs x 2 directions in one batch
    assert stub.distinct[0] == 2                                     # ... of 2 query slices, each encoded once
    for value in (1, 2):
        alone = propagate(StubModel(), image, np.where(ann == value, ann, 0), chain=True, gate=False,
                          normalized=True)
        assert np.array_equal(both.label == value, alone.label == value)


def test_encode_supports_keeps_each_support_to_its_own_query():
    """G one-shot supports in one batch give each query what its support alone gives (a k-shot
    encode_support of the same slices would average them)."""
    from lib.model import build_model

    torch.manual_seed(0)
    model = build_model("tiny").eval()
    s = model.config.image_size
    g = torch.Generator().manual_seed(0)
    images, queries = torch.rand(3, 1, s, s, generator=g), torch.rand(3, 1, s, s, generator=g)
    masks = torch.zeros(3, 1, s, s)
    for i, (y, x) in enumerate([(4, 4), (10, 14), (16, 6)]):
        masks[i, 0, y:y + 8, x:x + 8] = 1
    cache = model.encode_supports(images, masks)
    batched = model.predict(queries, cache)
    single = torch.cat([model.predict(queries[i:i + 1], model.encode_support(images[i:i + 1], masks[i:i + 1]))
                        for i in range(3)])
    assert cache.groups == 3 and batched.shape == (3, 1, s, s)
    assert torch.allclose(batched, single, atol=1e-4)
    prior = torch.cat([model.decode_prior(model.encode_support(images[i:i + 1], masks[i:i + 1])) for i in range(3)])
    assert torch.allclose(model.decode_prior(cache), prior, atol=1e-4)
    pooled = model.predict(queries, model.encode_support(images, masks))   # one 3-shot support
    assert not torch.allclose(batched, pooled, atol=1e-3)


def test_distinct_rows_finds_repeated_slices():
    a, b = np.zeros((4, 4), np.float32), np.eye(4, dtype=np.float32)
    rows, index = distinct_rows(np.stack([b, a, b, a, np.eye(4, dtype=np.float32)]))
    assert rows == [0, 1] and index.tolist() == [0, 1, 0, 1, 0]
    rows, index = distinct_rows(np.stack([a, b]))
    assert rows == [0, 1] and index.tolist() == [0, 1]


def test_a_query_slice_shared_by_several_supports_is_encoded_once():
    """predict(index=) encodes each distinct query slice once: the result equals the query repeated per
    support (up to the float rounding of another batch size), and Step.pairs uses it for repeated slices."""
    from lib.model import build_model

    torch.manual_seed(0)
    model = build_model("tiny").eval()
    s = model.config.image_size
    g = torch.Generator().manual_seed(1)
    images, queries = torch.rand(4, 1, s, s, generator=g), torch.rand(2, 1, s, s, generator=g)
    masks = torch.zeros(4, 1, s, s)
    for i, (y, x) in enumerate([(4, 4), (10, 14), (16, 6), (30, 30)]):
        masks[i, 0, y:y + 10, x:x + 10] = 1
    cache = model.encode_supports(images, masks)
    index = torch.tensor([0, 1, 0, 1])
    torch.testing.assert_close(model.predict(queries, cache, index=index), model.predict(queries[index], cache),
                               rtol=0, atol=1e-6)

    calls = []
    predict = model.predict
    model.predict = lambda q, c, index=None: calls.append((q.shape[0], index)) or predict(q, c, index=index)
    step = Step(model, 0.5)
    h = 40                                                        # slices of another size than the network's
    vol = np.random.default_rng(3).random((3, h, h)).astype(np.float32)
    sup = np.zeros((4, h, h), bool)
    for i, (y, x) in enumerate([(4, 4), (12, 16), (20, 6), (26, 26)]):
        sup[i, y:y + 10, x:x + 10] = True
    q = vol[[1, 2, 1, 2]]
    shared, _ = step.pairs(q, vol[[0, 0, 0, 0]], sup)
    assert calls[-1][0] == 2 and calls[-1][1].tolist() == [0, 1, 0, 1]   # 2 slices, 4 supports
    for i in range(4):                                            # each pair alone: its own query slice
        alone, _ = Step(model, 0.5).pairs(q[i:i + 1], vol[:1], sup[i:i + 1])
        np.testing.assert_allclose(shared[i], alone[0], rtol=0, atol=1e-5)
    step.pairs(vol[[1, 2]], vol[[0, 0]], sup[:2])
    assert calls[-1] == (2, None)                                 # all distinct: the plain call


def test_supports_of_a_round_are_aligned_on_several_threads_with_the_same_results():
    """Step(workers=2) registers the supports of a batch in 2 threads: the walks equal workers=1's."""
    import threading

    from lib.sample import phantom
    from lib.transforms.align import SliceAligner

    image, label = phantom((64, 64, 8), seed=3)
    slices = np.moveaxis(image, -1, 0)
    walks = [ChainWalk(4, label[..., 4] == v) for v in (1, 4)]        # liver and spleen from one slice
    aligner, seen = SliceAligner(), {1: set(), 2: set()}

    def run(workers):
        def align(query, im, mask):
            seen[workers].add(threading.get_ident())
            return aligner.align(query, im, mask)
        return chain(Step(StubModel(size=16), 0.5, align, workers=workers), slices, walks)

    one, two = run(1), run(2)
    assert len(seen[1]) == 1 and len(seen[2]) >= 2
    for (ma, pa), (mb, pb) in zip(one, two):
        assert ma[3].any() and ma[5].any() and np.array_equal(ma, mb) and np.array_equal(pa, pb)
    assert Step(StubModel(), 0.5).workers == torch.get_num_threads()
