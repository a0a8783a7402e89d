"""The app's logic without a server: propagation rules, input validation, --conf parsing, model choice."""
from __future__ import annotations

from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch

from lib.configs.app_config import ConfError, parse_conf
from lib.configs.model_store import ModelStore, choose_source
from lib.model import build_model, save_checkpoint


class StubModel:
    """Stands in for SD-FSMIS: the 'prediction' is the support mask (or a constant), so results are exact."""

    def __init__(self, size=16, constant=None):
        self.config = SimpleNamespace(image_size=size, threshold=0.5)
        self.constant = constant or []   # per encode_support call: a constant probability instead of the mask
        self.encoded, self.batches, self.segmented = [], [], []

    def encode_support(self, images, masks):
        assert images.shape == masks.shape == (1, 1, self.config.image_size, self.config.image_size)
        i = len(self.encoded)
        self.encoded.append(masks.clone())
        return torch.full_like(masks, self.constant[i]) if i < len(self.constant) else masks.clone()

    def predict(self, queries, cache):
        self.batches.append(queries.shape[0])
        return cache.expand(queries.shape[0], -1, -1, -1).clone()

    def segment(self, queries, support_images, support_masks, threshold=None, return_probs=False, align=None):
        """(N, H, W) queries, a (1, H, W) support -> the support mask (aligned onto each query) as probabilities."""
        self.segmented.append(np.asarray(queries).shape[0])
        masks = [align(q, support_images[0], support_masks[0])[1] if align else support_masks[0] for q in queries]
        probs = torch.as_tensor(np.stack(masks), dtype=torch.float32)
        return probs if return_probs else probs > 0.5


def test_scribbles_background_is_not_an_organ():
    from lib.configs.request import infer_options

    info = [{"name": "background_scribbles", "id": 2}, {"name": "foreground_scribbles", "id": 3}]
    assert infer_options({"label_info": info})["ignore"] == [2]
    assert infer_options({"ignore_labels": "5,6"})["ignore"] == [5, 6]


@pytest.mark.parametrize("params, words", [
    ({"threshold": "2"}, "between 0 and 1"), ({"batch_size": 1e999}, "integer between 1 and 4096"),
    ({"merge": "max"}, "probability | order"), ({"chain": "maybe"}, "true | false"),
    ({"ignore_labels": [None]}, "ignore_labels entry"), ({"label_info": [{"name": "x", "id": "x"}]}, "label_info id"),
    ({"result_extension": ".png"}, ".nii.gz | .nii | .nrrd"), ({"intensity": "maybe"}, "intensity.*true | false"),
])
def test_infer_options_name_the_key_and_the_valid_values(params, words):
    """One parser for request options (lib.configs.request), the same typed fields as --conf."""
    from lib.configs.fields import OptionError
    from lib.configs.request import infer_options

    with pytest.raises(OptionError, match=words):
        infer_options(params)
    assert infer_options({"threshold": "0.3", "chain": "no", "merge": ["order", "probability"]})["merge"] == "order"
    assert infer_options({})["intensity"] is True and infer_options({"intensity": "false"})["intensity"] is False


# ---- --conf ------------------------------------------------------------------------------------
@pytest.mark.parametrize("conf, words", [
    ({"preset": "huge"}, "mini | sd15 | tiny"),
    ({"device": "tpu"}, "auto | cpu | cuda"),
    ({"threshold": "1.5"}, "between 0 and 1"),
    ({"threshold": "abc"}, "between 0 and 1"),
    ({"batch_size": "0"}, "integer between 1 and 4096"),
    ({"merge": "max"}, "probability | order"),
    ({"use_trained": "maybe"}, "true | false"),
    ({"label_tag": ""}, "label_tag"),
    ({"labels": "liver"}, "name=value"),
    ({"checkpoint": "/no/such/folder"}, "folder not found"),
    ({"colour": "red"}, "valid keys are"),
])
def test_bad_conf_values_name_the_valid_choices(conf, words):
    with pytest.raises(ConfError, match=words):
        parse_conf(conf)


def test_conf_defaults_and_values(tmp_path):
    cfg = parse_conf({})
    assert (cfg.preset, cfg.device, cfg.batch_size, cfg.label_tag, cfg.threshold) == (None, "auto", 8, "final", None)
    assert cfg.train_folder(tmp_path) == tmp_path / "model" / "trained"
    cfg = parse_conf({"preset": "TINY", "threshold": "0.3", "batch_size": "2", "label_tag": "mine",
                      "labels": "spleen=1,liver=6", "device": "cpu"})
    assert (cfg.preset, cfg.threshold, cfg.batch_size, cfg.label_tag) == ("tiny", 0.3, 2, "mine")
    assert cfg.labels == (("spleen", 1), ("liver", 6))


# ---- model choice and reload ------------------------------------------------------------------
def test_model_choice_rules(tmp_path, monkeypatch):
    monkeypatch.delenv("SDFSMIS_SD_PATH", raising=False)
    app = tmp_path / "app"
    (app / "model").mkdir(parents=True)
    src = choose_source(parse_conf({"train_dir": str(tmp_path / "t")}), app)
    assert (src.kind, src.preset, src.trained) == ("preset", "mini", False)      # nothing embedded: random mini
    save_checkpoint(build_model("tiny"), app / "model")                          # an embedded checkpoint
    src = choose_source(parse_conf({"train_dir": str(tmp_path / "t")}), app)
    assert (src.kind, src.preset, src.trained) == ("embedded", "tiny", True)
    assert choose_source(parse_conf({"preset": "mini", "train_dir": str(tmp_path / "t")}), app).kind == "preset"
    ckpt = save_checkpoint(build_model("tiny"), tmp_path / "ckpt")
    src = choose_source(parse_conf({"checkpoint": str(ckpt)}), app)
    assert (src.kind, src.folder) == ("checkpoint", str(ckpt))
    with pytest.raises(ConfError, match="contradicts"):
        choose_source(parse_conf({"checkpoint": str(ckpt), "preset": "mini"}), app)
    with pytest.raises(ConfError, match="not an SD-FSMIS checkpoint"):
        choose_source(parse_conf({"checkpoint": str(tmp_path)}), app)


def test_store_reloads_a_published_checkpoint(tmp_path):
    train_dir = tmp_path / "train"
    cfg = parse_conf({"preset": "tiny", "train_dir": str(train_dir)})
    store = ModelStore(cfg, tmp_path / "app")
    first = store.get()
    assert store.get() is first and store.info()["kind"] == "preset"
    save_checkpoint(build_model("tiny"), train_dir / "model", extra={"iteration": 7})
    second = store.get()
    assert second is not first
    assert store.info()["kind"] == "trained" and store.info()["checkpoint_extra"]["iteration"] == 7
    assert store.get() is second                                                   # no change, no reload
    # a later start serves the published checkpoint unless use_trained is false
    assert choose_source(cfg, tmp_path / "app").kind == "trained"
    assert choose_source(parse_conf({"preset": "tiny", "train_dir": str(train_dir), "use_trained": "false"}),
                         tmp_path / "app").kind == "preset"


# ---- the sample study ----------------------------------------------------------------------------
def test_sample_study_layout(tmp_path):
    from lib.sample import main

    assert main(["--studies", str(tmp_path / "s"), "--volumes", "2"]) == 0
    images = sorted(p.name for p in (tmp_path / "s").glob("*.nii.gz"))
    assert images == ["phantom_1.nii.gz", "phantom_2.nii.gz"]
    label = np.asarray(nib.load(str(tmp_path / "s" / "labels" / "final" / "phantom_1.nii.gz")).dataobj)
    image = nib.load(str(tmp_path / "s" / "phantom_1.nii.gz"))
    assert label.shape == image.shape == (128, 128, 24)
    assert len(np.flatnonzero(label.any(axis=(0, 1)))) == 1 and set(np.unique(label).tolist()) == {0, 1, 2, 3, 4}
    assert image.header.get_zooms() == (1.5, 1.5, 5.0)



def test_the_shipped_model_is_served_by_default(tmp_path, monkeypatch):
    """apps/sdfsmis/model: a trained mini checkpoint (safetensors, <= 50 MB) that the app picks when
    neither a preset, a checkpoint nor SD v1.5 weights are configured, and that trained on images only."""
    from pathlib import Path

    from lib.model import load_checkpoint, read_meta

    monkeypatch.delenv("SDFSMIS_SD_PATH", raising=False)
    app = Path(__file__).resolve().parents[1] / "apps" / "sdfsmis"
    files = [f for f in (app / "model").rglob("*") if f.is_file() and "trained" not in f.parts]
    assert {f.name for f in files} >= {"model.safetensors", "config.json", "README.md"}
    assert sum(f.stat().st_size for f in files) <= 50 * 2 ** 20
    src = choose_source(parse_conf({"train_dir": str(tmp_path / "t")}), app)
    assert (src.kind, src.preset, src.trained) == ("embedded", "mini", True)
    assert choose_source(parse_conf({"preset": "mini", "train_dir": str(tmp_path / "t")}), app).kind == "embedded"
    meta = read_meta(app / "model")
    extra = meta["extra"]
    assert extra["stage"] == "sdfsmis" and extra["iteration"] > 0
    assert extra["options"]["exclude_labels"] is None          # Setting-2 exclusion would have read labels
    model = load_checkpoint(app / "model")
    assert model.config.prior_residual and model.unet.conv_out.weight.abs().sum() > 0   # trained, not fresh


def test_largest_component_drops_stray_blobs():
    from lib.transforms.postprocess import largest_component

    m = np.zeros((4, 10, 10), bool)
    m[:, 1:5, 1:5] = True
    m[2, 8, 8] = True
    out = largest_component(m)
    assert out.sum() == 4 * 16 and not out[2, 8, 8]
    assert not largest_component(np.zeros((3, 5, 5), bool)).any()


def test_intensity_gate_keeps_the_organ_and_drops_slices_without_it():
    from lib.transforms.postprocess import intensity_gate

    yy, xx = np.mgrid[0:32, 0:32]
    disc = (yy - 16) ** 2 + (xx - 16) ** 2 < 8 ** 2
    noise = np.random.default_rng(0).normal(0, 0.01, (3, 32, 32))
    query = 0.3 + noise                                   # slice 0: organ (0.8) with a dark vessel in it,
    query[0][disc] = 0.8                                  # slice 1: organ, slice 2: no organ at all
    query[0][15:17, 14:18] = 0.3
    query[1][disc] = 0.8 + noise[1][disc]
    support_image = np.where(disc, 0.8, 0.3)[None] + noise[:1]
    masks = np.zeros((3, 32, 32), bool)
    masks[:, 4:28, 4:28] = True                           # a too-large square, e.g. a copied mask
    out = intensity_gate(query, masks, support_image, disc[None])
    assert np.array_equal(out[0], disc)                   # the vessel's hole is filled
    assert (out[1] & disc).sum() / disc.sum() > 0.95 and not (out[1] & ~disc).any()   # noisy: a few edge pixels
    assert not out[2].any()                               # the organ ended: nothing in range left
    assert not intensity_gate(query, np.zeros_like(masks), support_image, disc[None]).any()
    with pytest.raises(ValueError, match="support mask is empty"):
        intensity_gate(query, masks, support_image, np.zeros((1, 32, 32), bool))


