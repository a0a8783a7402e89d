"""Evaluation measures what the app serves: the same group through the app's infer task and through
the evaluation's `sdfsmis` method gives identical masks (the embedded model, the app's default
settings: chained walk, intensity gate, registration-aligned supports, largest component, appearance
and intensity across volumes)."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lib.configs.app_config import parse_conf
from lib.configs.model_store import ModelStore
from lib.evaluation.dataset import EvalDataset
from lib.evaluation.methods import SDFSMISMethod
from lib.evaluation.protocol import Group, Job
from lib.infers.sdfsmis import SDFSMISInfer
from lib.infers.support import REQUEST_KEY, Support
from lib.pipeline import PropagateOptions
from lib.sample import phantom

ROOT = Path(__file__).resolve().parents[1]
LIVER = 1


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("served")
    affine = np.diag([1.5, 1.5, 5.0, 1.0])
    for k in (1, 2):
        image, label = phantom(shape=(96, 96, 16), seed=k)
        nib.save(nib.Nifti1Image(image.astype(np.float32), affine), str(folder / f"image_{k}.nii.gz"))
        nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), str(folder / f"label_{k}.nii.gz"))
    cfg = parse_conf({})
    store = ModelStore(cfg, ROOT / "apps" / "sdfsmis")
    return folder, cfg, store


def _served(setup, query: Path, annotation: np.ndarray, support: Path | None, folder: Path, **params) -> np.ndarray:
    """The app's infer task on `query` with `annotation` (on the support volume), request `params` ->
    label (H, W, Z)."""
    _, cfg, store = setup
    label_file = folder / "annotation.nii.gz"
    nib.save(nib.Nifti1Image(annotation, nib.load(str(support or query)).affine), str(label_file))
    kind = Support("uploaded", str(label_file)) if support is None else Support(
        "support_image", str(label_file), image=str(support), image_id="image_1", tag="eval")
    path, info = SDFSMISInfer(store, cfg)({"image": str(query), REQUEST_KEY: kind.to_request(), **params})
    assert info["walker"] == params.get("walker", cfg.walker)   # the result says how it was made
    return np.asarray(nib.load(path).dataobj)


@pytest.mark.parametrize("same_volume, walker", [(True, "registration"), (True, "network"), (False, "registration")])
def test_infer_task_and_evaluation_method_give_identical_masks(setup, same_volume, walker):
    folder, cfg, store = setup
    data = EvalDataset(folder, {"liver": LIVER})
    support, query = (1, 1) if same_volume else (0, 1)
    zs = data.slices[support]["liver"]
    support_z = zs[len(zs) // 2]
    query_z = tuple(z for z in data.slices[query]["liver"] if not (same_volume and z == support_z))
    group = Group(support, support_z, query_z)
    job = Job("all", query, "liver", LIVER, query_z, (group,))
    model = store.get()
    # across volumes the evaluation keeps the largest 3D component of the protocol's slices, the app of the
    # whole volume, where a blob can join it through slices the protocol leaves out: compared without it
    largest = cfg.largest and same_volume
    options = PropagateOptions.for_model(model, cfg.threshold, batch_size=cfg.batch_size, merge=cfg.merge,
                                         chain=cfg.chain, gate=cfg.gate, largest=largest, appearance=cfg.appearance,
                                         intensity=cfg.intensity, walker=walker)
    evaluated = SDFSMISMethod(model, options).run_group(data, job, group)             # (N, H, W)

    _, s_lbl, _ = data.load(support)
    annotation = np.zeros(s_lbl.shape, np.uint8)
    annotation[..., support_z] = s_lbl[..., support_z] == LIVER
    pairs = data.pairs
    served = _served(setup, pairs[query].image, annotation, None if same_volume else pairs[support].image, folder,
                     largest=largest, walker=walker)
    served = np.moveaxis(served[..., list(query_z)] > 0, -1, 0)
    assert evaluated.any() and evaluated.sum() > 0.5 * (data.load(query)[1][..., list(query_z)] == LIVER).sum()
    assert np.array_equal(evaluated, served)
