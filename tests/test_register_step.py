"""The registration walker (lib.pipeline.register_step): `walker = registration` walks inside one volume
by registering each neighbour's mask onto the slice; the network still segments across volumes."""
from __future__ import annotations

import numpy as np
import pytest

from lib.configs.app_config import ConfError, parse_conf
from lib.configs.fields import OptionError
from lib.configs.request import infer_options
from lib.pipeline import PropagateOptions, propagate
from lib.pipeline.register_step import RegistrationStep
from tests.test_pipeline import StubModel


def _drifting(n=9, size=64, speed=3):
    """A bright blob drifting `speed` px per slice -> (image (H, W, Z) in [0, 1], truth bool (H, W, Z))."""
    yy, xx = np.mgrid[0:size, 0:size]
    blobs = [np.exp(-(((yy - 32) / 8.0) ** 2 + ((xx - 14 - speed * z) / 7.0) ** 2)) for z in range(n)]
    image = np.stack([0.2 + 0.7 * b for b in blobs], axis=-1).astype(np.float32)
    return image, np.stack([b > 0.4 for b in blobs], axis=-1)


def _dice(a, b):
    return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def test_registration_walker_follows_the_organ_without_the_network():
    image, truth = _drifting()
    ann = np.zeros(image.shape, np.uint8)
    ann[..., 4] = truth[..., 4]
    stub = StubModel(size=64)   # unaligned: its own walk copies the annotation (test_pipeline)
    options = PropagateOptions(threshold=0.5, gate=False, largest=False, intensity=False, walker="registration")
    res = propagate(stub, image, ann, options, normalized=True)
    assert stub.encoded == [] and res.forward_passes == 0
    assert min(_dice(res.label[..., z] > 0, truth[..., z]) for z in range(9)) > 0.8
    conf = res.confidence[1]
    assert conf[4] == 1.0 and np.all(np.isfinite(conf)) and conf[0] < conf[3] < 1.0   # a product along the walk
    assert res.next_slice[1] in (0, 1, 7, 8)
    network = propagate(StubModel(size=64), image, ann, options.but(walker="network"), normalized=True)
    assert _dice(network.label[..., 0] > 0, truth[..., 0]) < 0.3


def test_across_volumes_the_network_segments_whatever_the_walker():
    image, truth = _drifting()
    ann = np.zeros(image.shape, np.uint8)
    ann[..., 4] = truth[..., 4]
    stub = StubModel(size=64)
    options = PropagateOptions(threshold=0.5, gate=False, largest=False, appearance=0.0, walker="registration")
    res = propagate(stub, image, ann, options, support_image=image, normalized=True)
    assert len(stub.encoded) > 0 and res.forward_passes > 0


def test_pairs_keep_pixels_and_supports_on_the_query_grid():
    image, truth = _drifting(n=2)
    q, s, m = image[..., 1], image[::2, ::2, 0], truth[::2, ::2, 0]   # the support on a coarser grid
    step = RegistrationStep(0.5, workers=2)
    probs, kept, seen = step.pairs(np.stack([q, q]), np.stack([s, s]), np.stack([m, m]), keep_pixels=1,
                                   supports=True)
    assert probs.shape == seen.shape == (2, 64, 64) and kept.all() and probs.dtype == np.float32
    assert np.array_equal(probs[0], probs[1]) and set(np.unique(probs)) <= {0.0, 1.0}
    assert _dice(probs[0] > 0.5, truth[..., 1]) > _dice(seen[0], truth[..., 1])   # registration moved it
    _, kept = step.pairs(q[None], s[None], m[None], keep_pixels=10 ** 6)
    assert not kept.any()
    with pytest.raises(ValueError, match="support mask is empty"):
        step.shared(q[None], s, np.zeros_like(m))


def test_walker_is_one_of_the_listed_choices_everywhere():
    with pytest.raises(ValueError, match="network | registration"):
        PropagateOptions(threshold=0.5, walker="demons")
    with pytest.raises(OptionError, match="walker.*network | registration"):
        infer_options({"walker": "demons"})
    with pytest.raises(ConfError, match="network | registration"):
        parse_conf({"walker": "demons"})
    assert infer_options({})["walker"] == parse_conf({}).walker == PropagateOptions.walker
    assert infer_options({"walker": ["registration", "network"]})["walker"] == "registration"   # a client's list
    assert parse_conf({"walker": "registration"}).walker == "registration"
