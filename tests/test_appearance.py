"""Place x appearance across volumes (lib.pipeline.appearance): the fused decision, its two limits,
and its path through the app's pipeline."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lib.pipeline.appearance import AppearancePrior
from lib.pipeline.refine import signed_distance, with_intensities


def _dice(a, b) -> float:
    return 2 * float((a & b).sum()) / max(int(a.sum() + b.sum()), 1)


def _slice(centre, rng, size=128):
    """A textured disc (the organ) of radius 22 on a smooth body: image in [0, 1], organ mask."""
    y, x = np.mgrid[:size, :size]
    organ = (y - centre[0]) ** 2 + (x - centre[1]) ** 2 < 22 ** 2
    body = 0.35 + 0.05 * np.sin(x / 9.0) + 0.02 * rng.standard_normal((size, size))
    stripes = 0.75 + 0.2 * np.sign(np.sin((x + y) / 2.0)) + 0.02 * rng.standard_normal((size, size))
    return np.where(organ, stripes, body).clip(0, 1).astype(np.float32), organ


def test_signed_distance_is_positive_inside_and_negative_outside():
    mask = np.zeros((9, 9), bool)
    mask[2:7, 2:7] = True
    d = signed_distance(mask)
    assert d[4, 4] == 3 and d[2, 2] == 1 and d[1, 4] == -1 and d[0, 0] < -2
    assert np.isneginf(signed_distance(np.zeros((4, 4), bool))).all()


def test_fusion_moves_a_misplaced_organ_onto_the_tissue_that_looks_like_it():
    """The place mask is shifted by 12 px; the query's own striped disc pulls the fused mask onto it.
    Weight 0 is appearance alone; a huge weight gives the place mask back unchanged."""
    rng = np.random.default_rng(0)
    support, s_mask = _slice((60, 60), rng)
    query, truth = _slice((64, 70), rng)
    place = np.roll(truth, 12, axis=1)[None]
    fused = AppearancePrior(0.25).fuse(query[None], support, s_mask, place)
    assert _dice(fused[0], truth) > _dice(place[0], truth) + 0.1
    alone = AppearancePrior(0.0, intensity=False).fuse(query[None], support, s_mask, place)
    np.testing.assert_array_equal(alone, AppearancePrior(0.25).logits(query[None], support, s_mask) > 0)
    np.testing.assert_array_equal(AppearancePrior(1000.0).fuse(query[None], support, s_mask, place), place)
    assert not AppearancePrior(0.25).fuse(query[None], support, s_mask, np.zeros_like(place)).any()


def test_the_steps_place_counts_only_where_it_agrees_with_the_located_support():
    """With a located support, the place term is the mean of both signed distances where the step's
    mask overlaps the located one (Dice >= AGREE), the located support's alone where it does not, and
    nothing where the step found nothing. A huge weight shows the place term itself."""
    from lib.pipeline.appearance import AGREE
    from lib.pipeline.confidence import dice

    rng = np.random.default_rng(0)
    support, s_mask = _slice((60, 60), rng)
    query, truth = _slice((64, 70), rng)
    prior = AppearancePrior(1000.0)
    near, far = np.roll(truth, 4, axis=1), np.roll(truth, 50, axis=0)
    assert dice(near, truth) >= AGREE > dice(far, truth)
    place, located = np.stack([near, far, np.zeros_like(truth)]), np.stack([truth] * 3)
    fused = prior.fuse(np.stack([query] * 3), support, s_mask, place, located)
    mean = (signed_distance(near) + signed_distance(truth)) / 2          # pixels at 0: appearance decides
    assert fused[0][mean > 0].all() and not fused[0][mean < 0].any()
    assert (fused[0] != truth).any() and (fused[0] != near).any()
    np.testing.assert_array_equal(fused[1], truth)       # the step went astray: the located support alone
    assert not fused[2].any()                              # the step found nothing: nothing
    unlocated = AppearancePrior(1000.0, locate=False).fuse(np.stack([query] * 3), support, s_mask, place, located)
    np.testing.assert_array_equal(unlocated, place)       # locating off: the step's place alone


def test_intensity_log_odds_favour_the_organs_values_over_its_surroundings():
    from lib.transforms.intensity import log_odds_at, organ_log_odds

    rng = np.random.default_rng(0)
    image, organ = _slice((60, 60), rng)
    image = np.where(organ, 0.7, image).astype(np.float32)
    table = organ_log_odds(image, organ, ring=10)
    assert table.shape == (32,) and table.dtype == np.float32
    odds = log_odds_at(table, image)
    assert (odds[organ] > 2).all() and (odds[(~organ) & (np.abs(image - 0.35) < 0.05)] < -2).all()
    stack = organ_log_odds(np.stack([image, image]), np.stack([organ, np.zeros_like(organ)]), ring=10)
    np.testing.assert_array_equal(stack, table)                  # a slice without organ adds no band
    with pytest.raises(ValueError, match="shape"):
        organ_log_odds(image, organ[:10], ring=10)


def test_intensity_trims_an_overgrown_place_to_the_querys_own_organ():
    """The place overshoots the organ by 6 px, and this patient's organ has the values that surround
    the organ on the support slice (a bright halo there): the support's log-odds cut into the organ,
    the query's own (from that first mask) cut the mask back to the organ's edge."""
    from scipy import ndimage

    from lib.transforms.intensity import log_odds_at, organ_log_odds

    rng = np.random.default_rng(0)
    support, s_mask = _slice((60, 60), rng)
    halo = np.abs(ndimage.distance_transform_edt(~s_mask) - 7) <= 3
    support = np.where(s_mask, 0.55, np.where(halo, 0.8, support)).astype(np.float32)
    query, truth = _slice((64, 70), rng)
    query = np.where(truth, 0.8, query).astype(np.float32)
    grown = ndimage.binary_dilation(truth, iterations=6)
    logit = 0.2 * signed_distance(grown)[None]
    first = logit + log_odds_at(organ_log_odds(support, s_mask, 20), query[None]) > 0
    assert _dice(first[0], truth) < 0.9                           # the support's intensities: misled
    fused = with_intensities(logit, query[None], support, s_mask)
    assert _dice(fused[0], truth) > 0.97


def test_propagation_across_volumes_fuses_each_result_and_the_seed_of_a_chain():
    """Across volumes every slice's result goes through the fusion, chained or not (the fused slices
    replace the seeded chain); inside one volume the option changes nothing."""
    from lib.model import build_model
    from lib.pipeline import PropagateOptions, propagate
    from lib.pipeline.step import Step

    torch.manual_seed(0)
    model = build_model("tiny").eval()
    rng = np.random.default_rng(1)
    support = np.stack([_slice((60, 60), rng)[0] for _ in range(3)], -1)
    query = np.stack([_slice((62, 66), rng)[0] for _ in range(3)], -1)
    ann = np.zeros(support.shape, np.uint8)
    ann[..., 1] = _slice((60, 60), rng)[1]
    off = PropagateOptions.for_model(model, chain=False, gate=False, largest=False, appearance=0.0)
    on = off.but(appearance=0.25)
    plain = propagate(model, query, ann, off, support_image=support, normalized=True).label
    fused = propagate(model, query, ann, on, support_image=support, normalized=True).label
    step = Step(model, off.threshold)
    q, s = np.moveaxis(query, -1, 0), np.moveaxis(support, -1, 0)
    prior = AppearancePrior(0.25)
    images, masks = prior.supports(q, s[1], ann[..., 1] > 0)                # located on each query slice
    located = step.pairs(q, images, masks)[0]
    expected = prior.fuse_probs(q, s[1], ann[..., 1] > 0, located, off.threshold, masks) > off.threshold
    np.testing.assert_array_equal(fused > 0, np.moveaxis(expected, 0, -1))
    probs = step.shared(q, s[1], ann[..., 1] > 0)
    np.testing.assert_array_equal(plain > 0, np.moveaxis(probs > off.threshold, 0, -1))
    assert (plain != fused).any()
    unlocated = propagate(model, query, ann, on.but(locate=False), support_image=support, normalized=True).label
    expected = prior.fuse_probs(q, s[1], ann[..., 1] > 0, probs, off.threshold) > off.threshold
    np.testing.assert_array_equal(unlocated > 0, np.moveaxis(expected, 0, -1))
    same = propagate(model, support, ann, on.but(chain=True), normalized=True).label
    np.testing.assert_array_equal(same, propagate(model, support, ann, off.but(chain=True), normalized=True).label)
    chained = propagate(model, query, ann, on.but(chain=True), support_image=support, normalized=True).label
    np.testing.assert_array_equal(chained, fused)        # across volumes, fused per slice in place of the chain
    with pytest.raises(ValueError, match="appearance"):
        off.but(appearance=-1.0)


def test_match_offsets_finds_where_the_support_template_moved():
    """Random features; the query slices are the support rolled by (3, -2) cells: that shift is found
    on every slice, also on one slice made noise (its neighbours outvote it); an empty mask: no shift."""
    from lib.model.prototypes import match_offsets

    torch.manual_seed(0)
    support = torch.randn(1, 16, 32, 32)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 12:18, 14:20] = 1
    query = torch.roll(support, shifts=(3, -2), dims=(2, 3)).repeat(5, 1, 1, 1)
    query[2] = torch.randn(16, 32, 32)
    offsets = match_offsets(query, support, mask)
    assert offsets.tolist() == [[3, -2]] * 5
    assert match_offsets(query, support, mask, window=0)[2].tolist() != [3, -2]
    assert match_offsets(query, support, torch.zeros_like(mask)).tolist() == [[0, 0]] * 5


def test_located_support_lands_on_the_query_organ():
    """The query's organ is 40 px away from the support's: the located support mask overlaps it far more
    than the support mask where it was; `locate` off gives the support unchanged; a support of another
    size is brought onto the query grid."""
    rng = np.random.default_rng(3)
    support, s_mask = _slice((40, 40), rng)
    queries, truths = zip(*[_slice((70, 72), rng) for _ in range(3)])
    queries, truths = np.stack(queries), np.stack(truths)
    images, masks = AppearancePrior(0.25).supports(queries, support, s_mask)
    assert images.shape == masks.shape == queries.shape
    for mask, truth in zip(masks, truths):
        assert _dice(mask, truth) > 0.6 > 0.1 > _dice(s_mask, truth)
    images, masks = AppearancePrior(0.25, locate=False).supports(queries, support, s_mask)
    np.testing.assert_array_equal(masks, np.repeat(s_mask[None], 3, 0))
    np.testing.assert_array_equal(images, np.repeat(support[None], 3, 0))
    big, big_mask = np.kron(support, np.ones((2, 2), np.float32)), np.kron(s_mask, np.ones((2, 2), bool))
    _, masks = AppearancePrior(0.25).supports(queries, big, big_mask)   # the same slice at 256
    assert masks.shape == queries.shape and all(_dice(m, t) > 0.6 for m, t in zip(masks, truths))


def test_located_rows_are_those_of_a_full_call_from_their_neighbours_alone():
    """Locating rows 0 and 9 of 10 slices embeds only them and their 3 neighbours each (8 slices, and the
    support), and gives them what locating all 10 gives them."""
    rng = np.random.default_rng(4)
    support, s_mask = _slice((40, 40), rng)
    queries = np.stack([_slice((50 + 3 * z, 60), rng)[0] for z in range(10)])
    prior, seen = AppearancePrior(0.25), []
    embed = prior._features
    prior._features = lambda x: (seen.append(len(x)), embed(x))[1]
    images, masks = prior.supports(queries, support, s_mask, rows=[0, 9])
    assert sorted(seen) == [1, 8]
    full_images, full_masks = AppearancePrior(0.25).supports(queries, support, s_mask)
    np.testing.assert_array_equal(masks, full_masks[[0, 9]])
    np.testing.assert_array_equal(images, full_images[[0, 9]])


def test_fused_rows_are_those_of_a_full_call_from_their_neighbours_alone():
    """The query's intensity statistics of a slice come from its +-WINDOW neighbours: fusing rows 0 and 9
    of 10 slices from their neighbourhoods (positions given) gives what fusing all 10 gives them, and
    they differ from statistics over all 10 slices at once (the organ's values drift along the stack)."""
    from lib.pipeline.appearance import WINDOW

    rng = np.random.default_rng(5)
    support, s_mask = _slice((60, 60), rng)
    queries, truths = zip(*[_slice((62, 64), rng) for _ in range(10)])
    queries = np.stack([np.where(t, q - 0.04 * z, q) for z, (q, t) in enumerate(zip(queries, truths))])
    place = np.stack([np.roll(t, 6, axis=1) for t in truths])
    prior = AppearancePrior(0.25)
    near = prior.neighbourhood([0, 9], 10)
    assert near.tolist() == [0, 1, 2, 3, 6, 7, 8, 9] and WINDOW == 3
    full = prior.fuse(queries, support, s_mask, place)
    part = prior.fuse(queries[near], support, s_mask, place[near], positions=near)
    np.testing.assert_array_equal(part[[0, -1]], full[[0, 9]])
    from lib.pipeline.refine import place_logit, signed_distance, with_intensities

    logit = prior.logits(queries, support, s_mask) + place_logit(np.stack([signed_distance(p) for p in place]), 0.25)
    np.testing.assert_array_equal(with_intensities(logit, queries, support, s_mask, window=WINDOW), full)
    assert (with_intensities(logit, queries, support, s_mask) != full).any()


def test_memo_passes_each_slice_through_the_backbone_once():
    """A request's organs fuse on the same query slices (and often one support slice): with `memo` each
    distinct slice is embedded once, and the logits are those computed without it."""
    rng = np.random.default_rng(2)
    support, s_mask = _slice((60, 60), rng)
    queries = np.stack([_slice((62, 64), rng)[0] for _ in range(3)])
    memo, plain = AppearancePrior(0.25, memo=True), AppearancePrior(0.25)
    seen = []
    embed = memo._features
    memo._features = lambda x: (seen.append(len(x)), embed(x))[1]
    for _ in range(2):                                        # two organs, same support slice and queries
        np.testing.assert_allclose(memo.logits(queries[[0, 1, 1, 2]], support, s_mask),   # batches differ: float noise
                                   plain.logits(queries[[0, 1, 1, 2]], support, s_mask), atol=1e-3)
    assert seen == [1, 3]                                     # support once, the 3 distinct queries once


def _episode_batch(rng, n=2, size=64):
    """n synthetic episodes at `size`: the support's disc and the query's (moved) disc."""
    pairs = [(_slice((30 + 4 * i, 30), rng, size), _slice((34, 28 + 4 * i), rng, size)) for i in range(n)]
    t = lambda arrays: torch.from_numpy(np.stack(arrays).astype(np.float32))[:, None]   # noqa: E731
    return (t([s[0] for s, _ in pairs]), t([s[1] for s, _ in pairs]), t([q[0] for _, q in pairs]),
            t([q[1] for _, q in pairs]))


def test_fine_tuning_lowers_the_episode_loss_and_its_weights_load_back(tmp_path):
    """A few optimiser steps of the self-supervised prototype loss on fixed episodes lower it; the saved
    trunk loads into a fresh backbone (no ImageNet file needed) and gives the trained features."""
    from lib.model.backbone import PretrainedFeatures
    from lib.training.appearance import episode_loss, freeze_batchnorm, save_weights

    torch.manual_seed(0)
    batch = _episode_batch(np.random.default_rng(3))
    features = PretrainedFeatures().train()
    freeze_batchnorm(features)
    opt = torch.optim.AdamW(features.parameters(), lr=1e-3)
    first = None
    for _ in range(6):
        loss = episode_loss(features, *batch)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert episode_loss(features, *batch).item() < first - 0.05
    save_weights(features, tmp_path / "appearance.safetensors")
    loaded = PretrainedFeatures(weights=tmp_path / "appearance.safetensors").eval()
    features.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch[0]), features(batch[0]))
        assert not torch.allclose(PretrainedFeatures().eval()(batch[0]), features(batch[0]))



def test_train_appearance_writes_its_weights_files(tmp_path):
    """`python -m lib.train_appearance` end to end on a synthetic volume (2 iterations): the periodic
    and final weights files are written and load into the backbone; bad options are refused."""
    from lib.model.backbone import PretrainedFeatures
    from lib.training.appearance import main
    from tests.synthetic_volumes import write_dataset

    data = write_dataset(tmp_path / "data", n=1)
    out = tmp_path / "run"
    assert main([str(data), "--out", str(out), "--iterations", "2", "--batch-size", "1", "--checkpoint-every", "1",
                 "--cache-dir", str(tmp_path / "cache"), "--no-progress"]) == 0
    assert {p.name for p in out.glob("*.safetensors")} == {"appearance-1.safetensors", "appearance-2.safetensors",
                                                          "appearance.safetensors"}
    PretrainedFeatures(weights=out / "appearance.safetensors")
    from lib.pipeline.appearance import AppearancePrior

    info = AppearancePrior(0.25, weights=out / "appearance.safetensors").describe()
    assert "fine-tuned" in info["backbone"] and len(info["backbone_sha256"]) == 64
    with pytest.raises(SystemExit):
        main([str(data), "--out", str(out), "--iterations", "0"])
