"""The SD-FSMIS network (tiny preset, CPU): shapes, conv_in widening, support cache, QE, VTCT, checkpoints."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lib.model import (
    PretrainedWeightsMissing, build_model, load_checkpoint, preset_config, read_meta, save_checkpoint,
)
from lib.model.conv_in import widen_conv_in
from lib.model.qe import enhance_query, masked_average, query_prototype
from lib.model.sii import SIIBasicTransformerBlock

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("tiny").eval()


def _episode(b: int, size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(b, 1, size, size, generator=g)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    mask = (((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size / 4) ** 2).float().expand(b, 1, -1, -1).clone()
    return img, mask


def test_shapes_through_the_pipeline(model):
    s = model.config.image_size
    img, mask = _episode(3, s)
    cache = model.encode_support(img[:1], mask[:1])
    assert cache.groups == 1 and cache.shots == 1
    assert cache.embedding.shape == (1, model.config.n_tokens, model.unet.config.cross_attention_dim)
    assert len(cache.tokens) == model.sii_blocks > 0
    probs = model.predict(img, cache)
    assert probs.shape == (3, 1, s, s)
    assert probs.min() >= 0 and probs.max() <= 1
    loss = model.loss(img, mask, img, mask)
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_every_transformer_block_has_sii(model):
    from diffusers.models.attention import BasicTransformerBlock

    blocks = [m for m in model.unet.modules() if isinstance(m, BasicTransformerBlock)]
    assert blocks and all(isinstance(b, SIIBasicTransformerBlock) for b in blocks)
    assert sorted(b.sii_index for b in blocks) == list(range(len(blocks)))
    b = blocks[0]  # initialised from the block's self-attention
    assert torch.equal(b.attn_sii.to_q.weight, b.attn1.to_q.weight)
    assert b.attn_sii.to_q.weight is not b.attn1.to_q.weight


def test_k_shot_support_tokens_concatenate(model):
    s = model.config.image_size
    img, mask = _episode(2, s)
    one = model.encode_support(img[:1], mask[:1])
    two = model.encode_support(img, mask)
    assert two.shots == 2
    for i, t in one.tokens.items():
        assert two.tokens[i].shape[1] == 2 * t.shape[1]
    assert model.predict(img[:1], two).shape == (1, 1, s, s)


def test_widened_conv_in_reproduces_pretrained_conv():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 16, 3, padding=1)
    wide = widen_conv_in(conv, 2)
    z = torch.randn(2, 4, 8, 8)
    assert wide.in_channels == 8
    torch.testing.assert_close(wide(torch.cat([z, z], 1)), conv(z), rtol=1e-5, atol=1e-6)
    # different halves give a different answer: the two halves really are used
    assert not torch.allclose(wide(torch.cat([z, torch.zeros_like(z)], 1)), conv(z))


def test_model_conv_ins_are_widened_from_the_unet_conv():
    torch.manual_seed(0)
    from diffusers import UNet2DConditionModel

    cfg = preset_config("tiny")
    torch.manual_seed(1)
    original = UNet2DConditionModel.from_config(cfg.unet).conv_in
    torch.manual_seed(1)
    m = build_model("tiny")
    z = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(m.conv_in_support(torch.cat([z, z], 1)), original(z), rtol=1e-5, atol=1e-6)
    # tiny has the support prior: the query conv takes [z_q, p_q, z_s^M, z_s^I]
    assert m.config.query_prior == "image+mask" and m.conv_in_query.in_channels == 16
    torch.testing.assert_close(m.conv_in_query(torch.cat([z] * 4, 1)), original(z), rtol=1e-5, atol=1e-6)
    assert m.unet.config.in_channels == 8


def test_support_cache_equals_recompute(model):
    s = model.config.image_size
    img, mask = _episode(4, s, seed=3)
    cache = model.encode_support(img[:1], mask[:1])
    cached = model.predict(img, cache)
    with torch.inference_mode():                           # forward: the support branch per query
        recomputed = model.decode(model(img, img[:1].expand(4, -1, -1, -1), mask[:1].expand(4, -1, -1, -1)))
    torch.testing.assert_close(cached, recomputed, rtol=1e-4, atol=1e-5)
    # and a different support gives a different answer (the cache is really used)
    other = model.encode_support(img[1:2], 1 - mask[:1])
    assert not torch.allclose(model.predict(img, other), cached)


def test_batched_equals_one_by_one(model):
    s = model.config.image_size
    img, mask = _episode(3, s, seed=5)
    cache = model.encode_support(img[:1], mask[:1])
    batched = model.predict(img, cache)
    single = torch.cat([model.predict(img[i:i + 1], cache) for i in range(3)])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)


def test_qe_selects_exactly_positions_above_threshold():
    p_s = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    z = torch.zeros(1, 4, 2, 2)
    z[0, :, 0, 0] = torch.tensor([2.0, 0.1, 0, 0])    # cos ~0.999 -> kept
    z[0, :, 0, 1] = torch.tensor([1.0, 1.0, 0, 0])    # cos 0.707 -> kept (> 0.7)
    z[0, :, 1, 0] = torch.tensor([1.0, 1.1, 0, 0])    # cos 0.673 -> dropped
    z[0, :, 1, 1] = torch.tensor([0.0, 0.0, 3.0, 0])  # cos 0 -> dropped
    p_q = query_prototype(p_s, z, 0.7)
    torch.testing.assert_close(p_q[0], (z[0, :, 0, 0] + z[0, :, 0, 1]) / 2)
    x = enhance_query(p_s, z, 0.7)
    assert x.shape == (1, 8, 2, 2)
    torch.testing.assert_close(x[0, 4:, 1, 1], p_q[0])


def test_qe_falls_back_to_support_prototype_when_nothing_passes():
    p_s = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    z = torch.zeros(2, 4, 3, 3)
    z[:, 2] = 1.0  # orthogonal to both prototypes
    torch.testing.assert_close(query_prototype(p_s, z, 0.7), p_s)


def test_masked_average_groups_shots():
    f = torch.arange(4 * 2 * 2 * 2, dtype=torch.float).reshape(4, 2, 2, 2)
    w = torch.zeros(4, 1, 2, 2)
    w[0, 0, 0, 0] = 1
    w[1, 0, 1, 1] = 1
    w[3, 0, 0, 1] = 1
    p = masked_average(f, w, groups=2)
    torch.testing.assert_close(p[0], (f[0, :, 0, 0] + f[1, :, 1, 1]) / 2)
    torch.testing.assert_close(p[1], f[3, :, 0, 1])


def test_vtct_pooling_uses_only_masked_patches(model):
    vtct = model.vtct
    g = vtct.grid
    tokens = torch.randn(1, g * g, vtct.encoder.config.hidden_size)
    mask = torch.zeros(1, 1, g * 14, g * 14)
    mask[..., : 14 * 2, : 14 * 2] = 1  # exactly patches (0,0),(0,1),(1,0),(1,1)
    proto = vtct.pool(tokens, mask, groups=1)
    inside = [0, 1, g, g + 1]
    torch.testing.assert_close(proto[0], tokens[0, inside].mean(0))
    changed = tokens.clone()
    outside = [i for i in range(g * g) if i not in inside]
    changed[0, outside] += 100.0
    torch.testing.assert_close(vtct.pool(changed, mask, groups=1), proto)
    changed[0, inside[0]] += 1.0
    assert not torch.allclose(vtct.pool(changed, mask, groups=1), proto)


def test_step_any_size_numpy(model):
    from lib.pipeline.step import Step

    rng = np.random.default_rng(0)
    q = rng.random((5, 40, 50)).astype(np.float32)
    s_img = rng.random((40, 50)).astype(np.float32)
    s_mask = np.zeros((40, 50), bool)
    s_mask[10:30, 10:30] = True
    thr = model.config.threshold
    out = Step(model, thr, batch_size=2).shared(q, s_img, s_mask)
    assert out.shape == (5, 40, 50) and out.dtype == np.float32
    np.testing.assert_allclose(Step(model, thr, batch_size=5).shared(q, s_img, s_mask), out, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="empty"):
        Step(model, thr).shared(q, s_img, np.zeros_like(s_mask))


def test_step_with_align_runs_every_query_with_its_own_support(model):
    """align: each query gets the support the callable returns for it; the identity alignment gives
    the shared-support result, and per-query supports match `pairs` exactly."""
    from lib.pipeline.step import Step

    rng = np.random.default_rng(1)
    q = rng.random((3, 40, 50)).astype(np.float32)
    s_img = rng.random((40, 50)).astype(np.float32)
    s_mask = np.zeros((40, 50), bool)
    s_mask[10:30, 12:32] = True
    calls = []

    def identity(query, image, mask):
        calls.append((query.shape, image.shape, mask.dtype))
        return image, mask

    thr = model.config.threshold
    shared = Step(model, thr).shared(q, s_img, s_mask)
    aligned = Step(model, thr, identity, batch_size=2).shared(q, s_img, s_mask)
    assert calls == [((40, 50), (40, 50), np.dtype(bool))] * 3
    np.testing.assert_allclose(aligned, shared, rtol=0, atol=1e-5)

    shifted = [np.roll(s_mask, 3 * i, axis=1) for i in range(3)]
    moved = iter(shifted)
    out = Step(model, thr, lambda qq, im, m: (im, next(moved))).shared(q, s_img, s_mask)
    pairs, kept = Step(model, thr, batch_size=3).pairs(q, np.repeat(s_img[None], 3, 0), np.stack(shifted))
    np.testing.assert_allclose(out, pairs, rtol=0, atol=1e-5)
    assert kept.all() and not np.allclose(out[0], out[2])     # the supports differ, so do the results
    with pytest.raises(ValueError, match="support mask is empty"):
        Step(model, thr).pairs(q[:1], s_img[None], np.zeros_like(s_mask)[None])


def test_edit_prior_keeps_the_full_resolution_support_where_the_network_changes_nothing():
    """edit_prior: where the prediction and the decoded support-mask latent agree, the result is the
    support mask itself at full resolution; where they differ, the network's probability."""
    from lib.pipeline.step import Step, apply_prior_edits, resize_mask, resize_slices

    p = np.array([[0.9, 0.2, 0.7, 0.1]])
    p0 = np.array([[0.8, 0.3, 0.2, 0.6]])
    prior = np.array([[True, True, False, False]])
    assert np.allclose(apply_prior_edits(p, p0, prior, 0.5), [[1, 1, 0.7, 0.1]])

    torch.manual_seed(3)
    m = build_model("tiny").eval()
    with torch.no_grad():                                 # a non-zero residual, so the network edits
        m.unet.conv_out.weight.normal_(0, 0.05)
    rng = np.random.default_rng(2)
    q = rng.random((2, 48, 48)).astype(np.float32)
    s_img = rng.random((48, 48)).astype(np.float32)
    s_mask = np.zeros((48, 48), bool)
    s_mask[10:31, 12:35] = True
    plain = Step(m, 0.5).shared(q, s_img, s_mask)
    size = m.config.image_size
    cache = m.encode_support(resize_slices(s_img[None], size), resize_mask(s_mask[None].astype(np.float32), size).float())
    p0 = resize_slices(m.decode_prior(cache), (48, 48))[:, 0].numpy()
    m.config.edit_prior = True
    edited = Step(m, 0.5).shared(q, s_img, s_mask)
    same = (plain > 0.5) == (p0 > 0.5)
    assert 0 < int(same.sum()) < same.size
    assert np.array_equal(edited[same], np.broadcast_to(s_mask, edited.shape)[same].astype(np.float32))
    assert np.array_equal(edited[~same], plain[~same])
    pairs, _ = Step(m, 0.5).pairs(q, np.repeat(s_img[None], 2, 0), np.repeat(s_mask[None], 2, 0))
    np.testing.assert_allclose(pairs, edited, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="edit_prior needs prior_residual"):
        build_model("tiny", edit_prior=True, prior_residual=False)
    with pytest.raises(ValueError, match="none | registration"):
        build_model("tiny", align_support="flow")


def test_resize_mask_keeps_a_tiny_organ_per_slice():
    from lib.pipeline.step import resize_mask

    masks = np.zeros((2, 64, 64), np.float32)
    masks[0, 10:40, 10:40] = 1            # large: > 0.5 after the shrink
    masks[1, 5, 5] = 1                    # one pixel: nothing > 0.5 at 16 px, kept as any coverage
    small = resize_mask(masks, 16)
    assert small.shape == (2, 1, 16, 16)
    assert 40 <= int(small[0].sum()) <= 64                 # 30 px square -> about 7.5 px at 16
    assert 1 <= int(small[1].sum()) <= 4                 # survives although slice 0 has pixels > 0.5


def test_training_step_reaches_new_layers(model):
    m = build_model("tiny")
    s = m.config.image_size
    img, mask = _episode(2, s)
    m.train()
    m.loss(img, mask, img, mask).backward()
    groups = m.param_groups()
    assert all(p.grad is not None for p in m.conv_in_support.parameters())
    assert all(p.grad is not None for p in m.vtct.mlp.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in groups["unet"])
    assert all(not p.requires_grad for p in m.vae.parameters())
    ids = [id(p) for g in groups.values() for p in g]
    assert len(ids) == len(set(ids))


def test_save_load_gives_identical_outputs(model, tmp_path):
    s = model.config.image_size
    img, mask = _episode(2, s, seed=7)
    model.config.threshold = 0.42
    try:
        folder = save_checkpoint(model, tmp_path / "ckpt")
    finally:
        model.config.threshold = 0.5
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    meta = read_meta(folder)
    assert meta["preset"] == "tiny" and meta["inference"] == {"threshold": 0.42, "timestep": 999, "image_size": s}
    loaded = load_checkpoint(folder)
    assert loaded.config.threshold == 0.42
    a = model.predict(img, model.encode_support(img[:1], mask[:1]))
    b = loaded.predict(img, loaded.encode_support(img[:1], mask[:1]))
    assert torch.equal(a, b)
    # saving again over the folder replaces it in place
    save_checkpoint(loaded, folder)
    assert load_checkpoint(folder).config.threshold == 0.42


def test_load_rejects_non_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an SD-FSMIS checkpoint"):
        load_checkpoint(tmp_path)


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="sd15, mini, mini-lite2, mini-lite2-ft, tiny"):
        build_model("big")


def test_sd15_without_weights_gives_actionable_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("SDFSMIS_SD_PATH", raising=False)
    with pytest.raises(PretrainedWeightsMissing) as err:
        build_model("sd15", sd_path=str(tmp_path / "missing-sd15"))
    msg = str(err.value)
    assert "sd_path" in msg and "SDFSMIS_SD_PATH" in msg and "huggingface-cli download" in msg
    assert "preset mini" in msg
    with pytest.raises(PretrainedWeightsMissing, match="sd_path"):
        build_model("sd15")  # no folder, empty hub cache, offline


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="reference configs (../shared/reference) not present")
def test_sd15_architecture_builds_from_reference():
    torch.manual_seed(0)
    m = build_model("sd15", pretrained=False, reference_dir=str(REFERENCE))
    base = sum(p.numel() for n, p in m.unet.named_parameters() if "_sii" not in n)
    assert 855e6 < base < 865e6  # SD v1.5 UNet: ~860M parameters (conv_in now per branch)
    assert m.config.latent_size == 32 and m.vtct.grid == 16 and m.sii_blocks == 16
    assert m.vtct.encoder.config.hidden_size == 384 and m.vae.config.scaling_factor == 0.18215
    assert m.conv_in_query.weight.shape == (320, 8, 3, 3)


def test_support_mask_prior_reaches_the_query_branch(model):
    """tiny/mini: the cache holds the mean support-mask and -image latents; the query branch uses them."""
    s = model.config.image_size
    img, mask = _episode(2, s, seed=5)
    one = model.encode_support(img[:2], mask[:2])                       # one 2-shot support
    assert one.prior.shape == (1, 8, model.config.latent_size, model.config.latent_size)
    torch.testing.assert_close(one.prior[0, :4], model.encode(mask[:2]).mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(one.prior[0, 4:], model.encode(img[:2]).mean(0), rtol=1e-5, atol=1e-6)
    cache = model.encode_support(img[:1], mask[:1])
    base = model.predict(img, cache)
    shifted = dataclasses.replace(cache, prior=cache.prior + 1.0)
    assert not torch.allclose(base, model.predict(img, shifted))       # the prior is really used
    with pytest.raises(ValueError, match="prior latents"):
        model.predict(img, dataclasses.replace(cache, prior=None))
    assert cache.to(dtype=torch.float16).prior.dtype == torch.float16


def test_prior_residual_starts_as_a_copy_of_the_support_mask():
    """tiny/mini: the UNet output is added to z_s^M and its output conv starts at zero, so a fresh
    network predicts the support-mask latent itself (the `copy` baseline); training learns the correction."""
    torch.manual_seed(3)
    fresh = build_model("tiny").eval()
    assert fresh.config.prior_residual and not fresh.unet.conv_out.weight.any()
    img, mask = _episode(3, fresh.config.image_size, seed=7)
    cache = fresh.encode_support(img[:1], mask[:1])
    with torch.no_grad():
        latents = fresh.query_branch(img, cache)
        torch.testing.assert_close(latents, fresh.encode(mask[:1]).expand(3, -1, -1, -1), rtol=1e-5, atol=1e-6)
        fresh.unet.conv_out.bias.fill_(0.5)                      # a non-zero UNet output is added on top
        torch.testing.assert_close(fresh.query_branch(img, cache), latents + 0.5, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="query_prior"):
        cfg = dataclasses.replace(fresh.config, query_prior="none")
        from diffusers import UNet2DConditionModel

        from lib.model.sdfsmis import SDFSMIS
        SDFSMIS(cfg, UNet2DConditionModel.from_config(cfg.unet), fresh.vae, fresh.vtct.encoder)


def test_mini_has_32x32_latents_and_no_attention_at_that_level():
    """mini: a 3-level VAE (128 px -> 32 x 32 latents) and a UNet whose 32 x 32 level is convolutions
    only; SII, VTCT cross-attention and self-attention sit in the 16 x 16 and 8 x 8 levels."""
    torch.manual_seed(0)
    m = build_model("mini").eval()
    assert m.config.latent_size == 32 and m.unet.config.sample_size == 32
    assert m.unet.config.down_block_types[0] == "DownBlock2D" and m.unet.config.up_block_types[-1] == "UpBlock2D"
    assert m.sii_blocks == 2 + 4 + 1      # 2 levels: 1 block per down, 2 per up (diffusers), + the mid block
    img, mask = _episode(2, 128, seed=1)
    with torch.no_grad():
        assert m.encode(img).shape == (2, 4, 32, 32)
        assert m.predict(img, m.encode_support(img[:1], mask[:1])).shape == (2, 1, 128, 128)
    sd = preset_config("sd15")                           # the paper's layout is unchanged
    assert sd.unet["down_block_types"][:3] == ["CrossAttnDownBlock2D"] * 3


def test_the_model_package_imports_no_monai():
    """DESIGN §1: lib/model imports torch / diffusers / transformers only, so it runs without MONAI."""
    import subprocess
    import sys

    code = ("import sys; import lib.model, lib.model.fast; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('monai', 'monailabel', 'SimpleITK'));"
            "print(bad); sys.exit(1 if bad else 0)")
    run = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
