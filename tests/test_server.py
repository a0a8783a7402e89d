"""The SD-FSMIS MONAI Label app end to end: a real server (tiny preset, CPU) driven by MONAILabelClient.

Tests run in file order on one module-scoped server (tests/conftest.py): infer from an uploaded,
a saved and another image's label, bad inputs (4xx, server stays healthy, datastore untouched),
batch infer, then training and the infer task picking up the new checkpoint.
"""
from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelUtils

from lib.sample import SPACING, phantom

LIVER, SPLEEN = 1, 4
TRAIN_TIMEOUT_S = 400


# ---- helpers -----------------------------------------------------------------------------------
def _save(arr, path: Path) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(arr), np.diag([*SPACING, 1.0])), str(path))
    return path


def _get(url: str):
    with urllib.request.urlopen(url, timeout=60) as r:
        return json.loads(r.read())


def _raw_infer(url, model, image, params=None, label=None, file=None):
    """POST /infer without the client's exception: -> (HTTP status, parsed body)."""
    files = {}
    if label:
        files["label"] = str(label)
    if file:
        files["file"] = str(file)
    status, form, _, _ = MONAILabelUtils.http_multipart(
        "POST", url, f"/infer/{model}?image={image}", {"params": json.dumps(params or {})}, files, headers={}
    )
    return status, form


def _snapshot(folder: Path) -> dict:
    """Files and their sizes / times; the datastore file by content, without the active-learning info
    that every successful infer records (lib.activelearning)."""
    out = {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
           for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "datastore_v2.json"}
    for p in folder.rglob("datastore_v2.json"):
        ds = json.loads(p.read_text())
        for obj in ds.get("objects", {}).values():
            info = obj.get("image", {}).get("info", {})
            for key in [k for k in info if k.startswith("sdfsmis_")]:
                del info[key]
        out[str(p.relative_to(folder))] = ds
    return out


def _two_organ_case(shape):
    """(image, one-slice annotation with liver and spleen, annotated z) for an uploaded case."""
    image, truth = phantom(shape, seed=5)
    both = [min((truth[..., z] == LIVER).sum(), (truth[..., z] == SPLEEN).sum()) for z in range(shape[-1])]
    z = int(np.argmax(both))
    assert both[z] > 0, "phantom must show both organs on one slice"
    ann = np.zeros(shape, np.uint8)
    ann[..., z] = np.where(np.isin(truth[..., z], [LIVER, SPLEEN]), truth[..., z], 0)
    return image, ann, z


@pytest.fixture(scope="module")
def case(sdfsmis_server):
    """Upload case_a (image) and write its two-organ one-slice annotation file (not saved to the datastore)."""
    from tests.conftest import SHAPE

    work = sdfsmis_server["work"]
    image, ann, z = _two_organ_case(SHAPE)
    image_file = _save(image, work / "case_a.nii.gz")
    label_file = _save(ann, work / "case_a_label.nii.gz")
    client = MONAILabelClient(sdfsmis_server["url"], tmpdir=str(work / "client"))
    (work / "client").mkdir(exist_ok=True)
    client.upload_image(str(image_file), image_id="case_a")
    return {"client": client, "image": image, "ann": ann, "z": z, "label_file": label_file,
            "image_file": image_file, "work": work}


def _check_result(path, ann, z):
    img = nib.load(path)
    result = np.asarray(img.dataobj)
    assert result.shape == ann.shape
    assert img.get_data_dtype() == np.uint8
    assert np.array_equal(result[..., z], ann[..., z]), "the annotated slice must be copied unchanged"
    assert {LIVER, SPLEEN} <= set(np.unique(result).tolist())
    return result


# ---- info --------------------------------------------------------------------------------------
def test_info_lists_the_tasks_and_their_config(sdfsmis_server):
    info = MONAILabelClient(sdfsmis_server["url"]).info()
    models = info["models"]
    assert {"sdfsmis": "annotation", "sdfsmis_scribbles": "scribbles", "sdfsmis_seg": "segmentation"} == {
        k: models[k]["type"] for k in ("sdfsmis", "sdfsmis_scribbles", "sdfsmis_seg")}
    assert all(models[k]["dimension"] == 3 for k in models)
    assert {"support_image", "support_tag", "threshold", "batch_size", "merge"} <= set(models["sdfsmis"]["config"])
    assert models["sdfsmis"]["config"]["support_tag"] == "final"
    assert "tiny" in models["sdfsmis"]["sdfsmis_model"]
    train_cfg = info["trainers"]["sdfsmis"]["config"]
    assert {"iterations", "lr_unet", "lr_new", "batch_size", "init", "checkpoint_every"} <= set(train_cfg)
    assert train_cfg["init"] == ["current", "preset"]


# ---- the three ways a support arrives ----------------------------------------------------------
def test_infer_from_uploaded_label(case):
    path, params = case["client"].infer("sdfsmis_scribbles", "case_a", {}, label_in=str(case["label_file"]))
    _check_result(path, case["ann"], case["z"])
    assert params["support"]["kind"] == "uploaded"
    assert params["organs"] == [LIVER, SPLEEN]
    assert params["copied_slices"] == [case["z"]]
    assert params["model"]["preset"] == "tiny"


def test_infer_from_saved_label(case, sdfsmis_server):
    case["client"].save_label("case_a", str(case["label_file"]), tag="final")
    assert (sdfsmis_server["studies"] / "labels" / "final" / "case_a.nii.gz").exists()
    path, params = case["client"].infer("sdfsmis_seg", "case_a", {})
    _check_result(path, case["ann"], case["z"])
    assert params["support"] == {"kind": "saved", "image_id": "case_a", "tag": "final",
                                 "slices": {str(LIVER): [case["z"]], str(SPLEEN): [case["z"]]}}


def test_infer_from_support_image_with_nrrd_result(case):
    path, params = case["client"].infer("sdfsmis", "phantom_2", {"support_image": "case_a", "result_extension": ".nrrd"})
    assert str(path).endswith(".nrrd")
    assert params["support"]["kind"] == "support_image" and params["support"]["image_id"] == "case_a"
    assert params["copied_slices"] == []            # another volume: nothing is copied, every slice predicted
    import SimpleITK as sitk

    result = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).transpose(2, 1, 0)
    assert result.shape == nib.load(str(case["image_file"])).shape
    assert set(np.unique(result).tolist()) <= {0, LIVER, SPLEEN}


# ---- bad input: 4xx, clear message, nothing saved, server healthy -------------------------------
def _bad_cases(case):
    work, ann, shape = case["work"], case["ann"], case["ann"].shape
    zero = _save(np.zeros(shape, np.uint8), work / "zero.nii.gz")
    small = _save(ann[:40], work / "small.nii.gz")
    frac = ann.astype(np.float32)
    frac[frac > 0] = 0.5
    frac = _save(frac, work / "frac.nii.gz")
    neg = ann.astype(np.int16)
    neg[neg == SPLEEN] = -1
    neg = _save(neg, work / "neg.nii.gz")
    flat = _save(case["image"][..., 0], work / "flat.nii.gz")
    flat_label = _save(ann[..., case["z"]], work / "flat_label.nii.gz")
    return [
        ("no annotation anywhere", dict(image="phantom_2"), 400, "no annotation"),
        ("all-zero annotation", dict(image="phantom_2", label=zero), 400, "empty"),
        ("annotation shape differs", dict(image="phantom_2", label=small), 400, "differs from the image shape"),
        ("non-integer values", dict(image="phantom_2", label=frac), 400, "non-integer"),
        ("negative values", dict(image="phantom_2", label=neg), 400, "negative"),
        ("unknown support_image", dict(image="phantom_2", params={"support_image": "nope"}), 404, "nope"),
        ("unknown image", dict(image="nope"), 404, "not in the datastore"),
        ("2D image", dict(image="", file=flat, label=flat_label), 400, "3D volume"),
        ("bad threshold", dict(image="case_a", label=case["label_file"], params={"threshold": "2"}), 400, "threshold"),
    ]


def test_bad_inputs_answer_4xx_and_the_server_stays_healthy(case, sdfsmis_server):
    url, studies = sdfsmis_server["url"], sdfsmis_server["studies"]
    before = _snapshot(studies)
    for name, kw, status, words in _bad_cases(case):
        got, body = _raw_infer(url, "sdfsmis", **kw)
        assert got == status, f"{name}: HTTP {got} {body!r}"
        detail = json.loads(body)["detail"]
        assert words in detail, f"{name}: unclear message {detail!r}"
        # the next good request still succeeds
        ok, _ = _raw_infer(url, "sdfsmis", "case_a", {"batch_size": 8}, label=case["label_file"])
        assert ok == 200, f"after {name}: HTTP {ok}"
    assert _snapshot(studies) == before, "a failed request changed the datastore"


# ---- batch infer ---------------------------------------------------------------------------------
def test_batch_infer_writes_a_label_for_every_image(sdfsmis_server):
    url, studies = sdfsmis_server["url"], sdfsmis_server["studies"]
    # the default multi_gpu=true must not crash on a CPU-only server
    params = {"support_image": "case_a", "label_tag": "sdfsmis_batch", "multi_gpu": True, "device": "cuda"}
    req = urllib.request.Request(f"{url}/batch/infer/sdfsmis?images=all&run_sync=true", method="POST",
                                 data=json.dumps(params).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=400) as r:
        result = json.loads(r.read())
    images = sorted(_get(f"{url}/datastore/?output=all")["objects"])
    assert images == ["case_a", "phantom_1", "phantom_2"]
    assert sorted(result) == images and not any("error" in (v or {}) for v in result.values()), result
    for image_id in images:
        assert (studies / "labels" / "sdfsmis_batch" / f"{image_id}.nii.gz").is_file(), image_id
    # an image with its own saved label is supported by it (phantom_1: final label from lib.sample)
    assert result["phantom_1"]["params"]["support"]["kind"] == "saved"
    assert result["phantom_2"]["params"]["support"]["kind"] == "support_image"


# ---- training, then the infer task serves the new checkpoint --------------------------------------
def test_train_reports_progress_and_infer_reloads_the_checkpoint(case, sdfsmis_server):
    url, train_dir = sdfsmis_server["url"], sdfsmis_server["train_dir"]
    client = case["client"]
    started = client.train_start("sdfsmis", {"iterations": 3, "checkpoint_every": 1, "init": "current"})
    assert started["status"] in ("SUBMITTED", "RUNNING")
    deadline = time.monotonic() + TRAIN_TIMEOUT_S
    status = None
    while time.monotonic() < deadline:
        status = client.train_status()
        if status["status"] not in ("SUBMITTED", "RUNNING"):
            break
        time.sleep(2)
    assert status and status["status"] == "DONE", f"training did not finish: {status}"
    stats = client.info()["train_stats"]["sdfsmis"]
    assert stats["status"] == "DONE" and stats["epoch"] == 3 and stats["total_epochs"] == 3, stats
    assert "total_time" in stats and 0.0 < stats["best_metric"] <= 1.0
    published = train_dir / "model"
    assert (published / "config.json").is_file()

    path, params = client.infer("sdfsmis", "case_a", {})
    _check_result(path, case["ann"], case["z"])
    served = params["model"]
    assert served["kind"] == "trained" and served["trained"] is True
    assert served["checkpoint"] == "<train_dir>/model"     # answers name no server path (lib/server/guard.py)
    assert not (train_dir / "trainer.lock").exists(), "the trainer lock was left behind"
    assert served["checkpoint_extra"]["iteration"] == 3
