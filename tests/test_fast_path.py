"""The fast inference path (lib.pipeline.step.Step: support cache, batched queries, lib.model.fast
options) gives the same masks as the naive per-slice loop (model.forward per slice), tiny preset, CPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lib.model import build_model
from lib.model.fast import enable_fast
from lib.pipeline.step import Step


def _volume(n: int, size: int, seed: int = 0):
    """(n, size, size) images in [0, 1] with a bright disc of changing radius, and its masks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    imgs, masks = [], []
    for i in range(n):
        disc = (yy - 0.5) ** 2 + (xx - 0.55) ** 2 < (0.12 + 0.02 * i) ** 2
        imgs.append(np.clip(0.3 + 0.5 * disc + rng.normal(0, 0.05, (size, size)), 0, 1))
        masks.append(disc)
    return np.stack(imgs).astype(np.float32), np.stack(masks).astype(np.float32)


def _naive(model, query, s_img, s_mask) -> torch.Tensor:
    q, si, sm = (torch.from_numpy(a)[:, None] for a in (query, s_img, s_mask))
    with torch.inference_mode():
        return torch.cat([model.decode(model(q[i:i + 1], si[None, :, 0], sm[None, :, 0]))[:, 0]
                          for i in range(q.shape[0])])


def _fast(model, query, s_img, s_mask, batch_size: int = 8) -> torch.Tensor:
    return torch.from_numpy(Step(model, model.config.threshold, batch_size=batch_size).shared(query, s_img[0], s_mask[0]))


@pytest.fixture()
def model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny tensors: one thread is fastest, and robust on a busy CPU
    torch.manual_seed(0)
    yield build_model("tiny").eval()
    torch.set_num_threads(threads)


@pytest.mark.parametrize("channels_last", [False, True])
def test_fast_path_equals_naive_loop(model, channels_last):
    s = model.config.image_size
    images, masks = _volume(4, s)
    query, s_img, s_mask = images[1:], images[:1], masks[:1]
    naive = _naive(model, query, s_img, s_mask)
    enable_fast(model, channels_last=channels_last)
    fast = _fast(model, query, s_img, s_mask, batch_size=2)   # batches of 2 + 1 slices
    assert fast.shape == naive.shape == (3, s, s)
    torch.testing.assert_close(fast, naive, rtol=0, atol=5e-4)   # channels-last reorders float sums
    # a threshold that splits the random-weight output into two real classes makes the mask check bite
    thr = float(naive.median())
    assert 0 < (naive > thr).float().mean() < 1
    margin = (naive - thr).abs() > 5e-4                      # pixels not within float noise of the threshold
    assert torch.equal((fast > thr)[margin], (naive > thr)[margin])


def test_fast_path_detects_a_different_support(model):
    """The comparison can fail: another support slice changes the probabilities."""
    s = model.config.image_size
    images, masks = _volume(4, s)
    a = _fast(model, images[1:], images[:1], masks[:1])
    b = _fast(model, images[1:], images[3:], masks[3:])
    assert (a - b).abs().max() > 1e-4


def test_enable_fast_keeps_fp32_on_cpu(model):
    enable_fast(model, dtype=torch.float16)
    assert model.autocast_dtype is None
