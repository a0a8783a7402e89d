"""Evaluation harness (lib/evaluate.py, lib/evaluation): protocol rules, metrics, baselines, reports.

Synthetic volumes written by the tests; CPU; the SD-FSMIS run uses the tiny preset.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from lib.data.volumes import DatasetError
from lib.evaluate import evaluate, main
from lib.evaluation.dataset import EvalDataset
from lib.evaluation.methods import CopyMethod, RegistrationMethod
from lib.evaluation.metrics import aggregate, volume_diagonal_mm, volume_metrics
from lib.evaluation.paper import paper_rows
from lib.evaluation.protocol import (
    Group, Job, ProtocolError, detect_dataset, parse_organs, propagation_plan, protocol_plan, query_chunks, rpt_folds,
    split_fold, support_slice_positions,
)
from lib.evaluation.runner import run_plan
from lib.evaluation.server import ServerMethod

CASE_IDS = [1, 2, 3, 5, 8, 10, 13, 15, 19, 20]   # not contiguous: folds index the numeric sort
SPACING = (1.5, 1.5, 3.0)
H = W = 32
Z = 12
A_SLICES = range(2, 10)      # organ "a" (label 1): 8x8 square shifted by the volume's index
B_BOX = (slice(20, 26), slice(18, 28), slice(3, 9))   # organ "b" (label 2): the same in every volume


def _volume(index: int) -> tuple[np.ndarray, np.ndarray]:
    label = np.zeros((H, W, Z), np.int16)
    label[8:16, 4 + index:12 + index, A_SLICES.start:A_SLICES.stop] = 1
    label[B_BOX] = 2
    yy = np.linspace(0, 1, H)[:, None, None]
    image = (20 + 30 * yy + 100 * (label == 1) + 60 * (label == 2)).astype(np.float32) * np.ones((1, W, Z))
    return image.astype(np.float32), label


def _write_dataset(folder: Path, n: int = 10) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    affine = np.diag([*SPACING, 1.0])
    for index, case in enumerate(CASE_IDS[:n]):
        image, label = _volume(index)
        nib.save(nib.Nifti1Image(image, affine), str(folder / f"image_{case}.nii.gz"))
        nib.save(nib.Nifti1Image(label, affine), str(folder / f"label_{case}.nii.gz"))
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return _write_dataset(tmp_path_factory.mktemp("synthetic") / "abd-mri")


# ----------------------------------------------------------------------------- protocol rules
def test_folds_match_rpt_tables():
    # RPT dataset_specifics.get_folds: CHAOST2 (20 volumes) and SABS (30 volumes), sorted indices.
    assert rpt_folds(20) == [list(range(0, 5)), list(range(4, 9)), list(range(8, 13)), list(range(12, 17)),
                             [0, 16, 17, 18, 19]]
    assert rpt_folds(30) == [list(range(0, 7)), list(range(6, 13)), list(range(12, 19)), list(range(18, 25)),
                             [0, 24, 25, 26, 27, 28, 29]]
    with pytest.raises(ProtocolError, match="at least 10 volumes"):
        rpt_folds(9)


def test_support_is_position_2_of_the_fold():
    assert split_fold([0, 16, 17, 18, 19]) == (17, [0, 16, 18, 19])
    assert split_fold(list(range(4, 9))) == (6, [4, 5, 7, 8])


def test_chunks_and_support_slices_follow_linspace_and_int_p_ns():
    assert support_slice_positions(12) == [2, 6, 10]
    assert support_slice_positions(7) == [1, 3, 5]         # int(7/6)=1, int(3.5)=3, int(35/6)=5
    assert query_chunks(10) == [(0, 3), (3, 6), (6, 10)]    # linspace(0, 10, 4) = 0, 3.33, 6.67, 10
    assert query_chunks(2) == [(0, 0), (0, 1), (1, 2)]

    n = 10
    slices = [{"a": list(range(5, 5 + 7 + i))} for i in range(n)]   # volume i: 7+i organ slices from z=5
    plan = protocol_plan(slices, {"a": 1}, [0, 4], list(range(100, 100 + n)))
    assert plan.folds[0] == {"volumes": [100, 101, 102], "support": 102, "queries": [100, 101]}
    assert plan.folds[4]["support"] == 109 and plan.folds[4]["queries"] == [100, 108]
    job = next(j for j in plan.jobs if j.fold == 0 and j.query == 1)
    support = slices[2]["a"]                                          # Ns = 9 -> positions 1, 4, 7
    assert [g.support_z for g in job.groups] == [support[1], support[4], support[7]]
    q = slices[1]["a"]                                                # C = 8 -> chunks 0:2, 2:5, 5:8
    assert [g.query_z for g in job.groups] == [tuple(q[0:2]), tuple(q[2:5]), tuple(q[5:8])]
    assert job.scored_z == tuple(q) and all(g.support == 2 for g in job.groups)


def test_propagation_uses_the_middle_slice_and_scores_the_rest_of_the_extent():
    slices = [{"a": [3, 4, 6, 7]}]          # extent 3..7 (5 is a gap), middle organ slice = 6
    plan = propagation_plan(slices, {"a": 1}, {"all": [0]}, [42])
    (job,) = plan.jobs
    assert job.groups[0].support == 0 and job.groups[0].support_z == 6
    assert job.scored_z == (3, 4, 5, 7) and job.groups[0].query_z == job.scored_z


def test_organ_and_dataset_arguments():
    assert detect_dataset("abd-mri") == "abd-mri" and detect_dataset("abd-ct") == "abd-ct"
    assert detect_dataset("volumes") is None
    assert parse_organs(None, "abd-ct") == {"liver": 6, "spleen": 1, "LK": 3, "RK": 2}
    assert parse_organs("liver=1,spleen=4", None) == {"liver": 1, "spleen": 4}
    assert parse_organs("rk,liver", "abd-mri") == {"RK": 2, "liver": 1}
    with pytest.raises(ProtocolError, match="unknown organ 'heart'"):
        parse_organs("heart", "abd-mri")
    with pytest.raises(ProtocolError, match="--dataset"):
        parse_organs(None, None)


# ----------------------------------------------------------------------------- metrics
def test_perfect_prediction_scores_dice_1_and_hd95_0():
    gt = np.zeros((20, 20, 6), bool)
    gt[5:12, 4:15, 1:5] = True
    m = volume_metrics(gt.copy(), gt, SPACING)
    assert m["dice"] == pytest.approx(1.0) and m["hd95"] == 0.0 and m["assd"] == 0.0


def test_surface_distances_equal_monai_compute_functions():
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    rng = np.random.default_rng(0)
    gt = np.zeros((30, 30, 8), bool)
    gt[8:20, 6:22, 2:7] = True
    pred = np.roll(gt, 3, axis=0) | (rng.random(gt.shape) > 0.995)
    m = volume_metrics(pred, gt, SPACING)
    p, g = (torch.from_numpy(x)[None, None].float() for x in (pred, gt))
    hd = compute_hausdorff_distance(p, g, include_background=True, percentile=95, spacing=list(SPACING))
    asd = compute_average_surface_distance(p, g, include_background=True, symmetric=True, spacing=list(SPACING))
    assert m["hd95"] == pytest.approx(hd.item(), rel=1e-5) and m["hd95"] > 0
    assert m["assd"] == pytest.approx(asd.item(), rel=1e-5)
    inter = (pred & gt).sum()
    assert m["dice"] == pytest.approx(2 * inter / (pred.sum() + gt.sum()), rel=1e-5)


def test_empty_prediction_rules():
    gt = np.zeros((10, 20, 4), bool)
    gt[2:5, 2:5, 1] = True
    m = volume_metrics(np.zeros_like(gt), gt, (2.0, 1.0, 5.0))
    assert m["empty"] and m["dice"] == 0.0
    assert m["hd95"] == pytest.approx(math.sqrt(20 ** 2 + 20 ** 2 + 20 ** 2)) == volume_diagonal_mm(gt.shape, (2, 1, 5))
    m = volume_metrics(np.zeros_like(gt), gt, (2.0, 1.0, 5.0), empty="exclude")
    assert math.isnan(m["hd95"])
    records = [{"fold": 0, "organ": "a", "dice": 0.0, "hd95": float("nan"), "assd": float("nan")},
               {"fold": 0, "organ": "a", "dice": 0.5, "hd95": 4.0, "assd": 2.0},
               {"fold": 1, "organ": "a", "dice": 1.0, "hd95": 0.0, "assd": 0.0}]
    s = aggregate(records, ["a"])
    assert s["dice"]["a"] == pytest.approx((0.25 + 1.0) / 2)     # volumes within a fold, then folds
    assert s["hd95"]["a"] == pytest.approx(2.0) and s["dice"]["mean"] == s["dice"]["a"]


# ----------------------------------------------------------------------------- runs on a folder
def test_copy_baseline_gives_the_hand_computed_dice_and_reports_parse(data, tmp_path):
    out = tmp_path / "copy"
    results = evaluate(["--data", str(data), "--method", "copy", "--organs", "a=1,b=2", "--folds", "0,4",
                        "--out", str(out), "--no-progress"])
    # fold 0 = indices 0,1,2 (support 2); fold 4 = indices 0,8,9 (support 9). Organ a of index i is
    # shifted by i columns: copy Dice per query = (8 - |shift difference|) / 8.
    fold0 = np.mean([(8 - 2) / 8, (8 - 1) / 8])
    fold4 = np.mean([0.0, (8 - 1) / 8])            # index 0 vs 9: no overlap; index 8 vs 9
    s = results["summary"]
    assert s["per_fold"]["dice"]["0"]["a"] == pytest.approx(fold0, abs=1e-6)
    assert s["per_fold"]["dice"]["4"]["a"] == pytest.approx(fold4, abs=1e-6)
    assert s["dice"]["a"] == pytest.approx((fold0 + fold4) / 2, abs=1e-6)
    # organ b is identical in every volume: copy is a perfect predictor
    assert s["dice"]["b"] == pytest.approx(1.0) and s["hd95"]["b"] == 0.0 and s["assd"]["b"] == 0.0
    assert results["plan"]["layout"]["0"]["support"] == 3 and results["plan"]["layout"]["4"]["support"] == 20
    # no overlap is not an empty prediction: copy never predicts nothing
    assert s["n_empty_predictions"] == 0

    parsed = json.loads((out / "results.json").read_text())
    assert parsed["method"] == "copy" and parsed["mode"] == "protocol"
    assert parsed["command"].startswith("python -m lib.evaluate --data")
    assert len(parsed["per_volume"]) == 8 and parsed["timings"]["total_s"] > 0
    md = (out / "results.md").read_text()
    assert "| **copy baseline** |" in md and "## Surface distances" in md
    pngs = sorted((out / "overlays").glob("*.png"))
    assert [p.name for p in pngs] == ["overlay_a.png", "overlay_b.png"]
    from PIL import Image

    assert Image.open(pngs[0]).size[0] > 100


def test_gate_trims_a_baseline_to_the_organs_intensity(data, tmp_path):
    """--gate works for every method: copy's shifted masks keep only organ-intensity pixels (precision 1)."""
    args = ["--data", str(data), "--method", "copy", "--organs", "a=1", "--folds", "0", "--no-progress",
            "--overlay-slices", "0"]
    plain = evaluate(args + ["--out", str(tmp_path / "plain")])
    gated = evaluate(args + ["--out", str(tmp_path / "gated"), "--gate"])
    assert gated["models"]["0"]["intensity_gate"] is True and plain["models"]["0"]["intensity_gate"] is False
    assert gated["summary"]["dice"]["a"] > plain["summary"]["dice"]["a"] + 0.03


def test_propagation_mode_runs_every_volume_once(data, tmp_path):
    results = evaluate(["--data", str(data), "--method", "copy", "--organs", "b=2", "--mode", "propagation",
                        "--out", str(tmp_path / "prop"), "--no-progress", "--overlay-slices", "0"])
    assert [r["query"] for r in results["per_volume"]] == CASE_IDS
    assert all(r["n_slices"] == 5 and r["dice"] == pytest.approx(1.0) for r in results["per_volume"])
    assert not (tmp_path / "prop" / "overlays").exists()


def test_sdfsmis_runs_end_to_end_with_a_tiny_checkpoint(data, tmp_path):
    from lib.model import build_model, save_checkpoint

    torch.manual_seed(0)
    ckpt = save_checkpoint(build_model("tiny"), tmp_path / "ckpt-0")
    out = tmp_path / "sd"
    code = main(["--data", str(data), "--checkpoint", str(tmp_path / "ckpt-{fold}"), "--organs", "a=1",
                 "--folds", "0", "--batch-size", "4", "--setting", "2", "--out", str(out), "--no-progress"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    digest = hashlib.sha256((ckpt / "model.safetensors").read_bytes()).hexdigest()
    assert results["models"]["0"]["weights_sha256"] == digest
    assert results["models"]["0"]["config"]["preset"] == "tiny"
    assert results["setting"] == 2 and len(results["per_volume"]) == 2
    assert 0.0 <= results["summary"]["dice"]["a"] <= 1.0
    assert results["timings"]["calls"] == 6       # 2 queries x 3 chunks: one segment() call per chunk


def test_sdfsmis_aligned_and_chained_runs_both_modes(data, tmp_path):
    """A model with align_support + edit_prior, --chain --gate: propagation walks from the annotation;
    protocol seeds each chunk's middle slice from the support (one model.segment call per chunk)."""
    from lib.model import build_model, save_checkpoint

    torch.manual_seed(0)
    save_checkpoint(build_model("tiny", align_support="registration", edit_prior=True), tmp_path / "ckpt")
    for mode in ("propagation", "protocol"):
        out = tmp_path / mode
        assert main(["--data", str(data), "--checkpoint", str(tmp_path / "ckpt"), "--organs", "a=1", "--folds", "0",
                     "--mode", mode, "--chain", "--gate", "--out", str(out), "--no-progress",
                     "--overlay-slices", "0"]) == 0
        results = json.loads((out / "results.json").read_text())
        described = results["models"]["0"] if mode == "protocol" else next(iter(results["models"].values()))
        assert described["align_support"] == "registration" and described["chain"] and described["intensity_gate"]
        assert all(0.0 <= r["dice"] <= 1.0 for r in results["per_volume"])


class FakeClient:
    """A fake MONAI Label app whose 'model' copies the one annotated support slice to every slice."""

    def __init__(self, tmp_path):
        self.tmp, self.labels, self.calls = tmp_path, {}, []

    def upload_image(self, path, image_id=None):
        self.calls.append(("upload", image_id))

    def save_label(self, image_id, label_in, tag=""):
        self.labels[(image_id, tag)] = np.asarray(nib.load(label_in).dataobj)

    def remove_label(self, image_id, tag):
        return self.labels.pop((image_id, tag), None) is not None

    def _segment(self, image_id, params, label=None):
        if label is None:
            label = self.labels.get((image_id, params["support_tag"]))
        if label is None:     # the query's own label under the support tag is never there in cross-volume runs
            label = self.labels[(params["support_image"], params["support_tag"])]
        annotated = np.flatnonzero(label.any(axis=(0, 1)))
        assert len(annotated) == 1               # exactly the prescribed support slice
        return np.repeat(label[..., annotated], label.shape[-1], axis=-1).astype(np.uint8)

    def _file(self, volume):
        path = self.tmp / f"result_{len(self.calls)}.nii.gz"
        nib.save(nib.Nifti1Image(volume, np.eye(4)), str(path))
        return str(path)

    def infer(self, model, image_id, params, label_in=None):
        assert model == "sdfsmis"
        label = np.asarray(nib.load(label_in).dataobj) if label_in else None
        self.calls.append(("infer", image_id, params.get("support_image")))
        return self._file(self._segment(image_id, params, label)), {}

    def run_batch(self, model, params):
        assert model == "sdfsmis" and params["label_tag"] != params["support_tag"]
        for image_id in params["images"]:
            self.labels[(image_id, params["label_tag"])] = self._segment(image_id, params)
        self.calls.append(("batch", tuple(params["images"]), params.get("support_image")))

    def fetch_label(self, image_id, tag, wait_s=0):
        return self._file(self.labels[(image_id, tag)])


@pytest.mark.parametrize("batch", [True, False])
def test_server_method_sends_the_prescribed_support_slice(data, tmp_path, batch):
    organs = {"a": 1}
    dataset = EvalDataset(data, organs)
    plan = protocol_plan(dataset.slices, organs, [0], dataset.case_ids)
    client = FakeClient(tmp_path)
    method = ServerMethod("http://fake", "abd-mri", client=client, tmpdir=tmp_path, batch=batch)
    server = run_plan(dataset, plan, lambda f: method, overlay_slices=0, progress=False)
    local = run_plan(dataset, plan, lambda f: CopyMethod(), overlay_slices=0, progress=False)
    assert [r["dice"] for r in server["records"]] == pytest.approx([r["dice"] for r in local["records"]])
    if batch:    # fold 0: 2 queries x 3 chunks = one batch per support slice, over both queries
        batches = [c for c in client.calls if c[0] in ("batch", "infer")]
        assert batches == [("batch", ("abd-mri_image_1", "abd-mri_image_2"), "abd-mri_image_3")] * 3
    else:
        infers = [c for c in client.calls if c[0] == "infer"]
        assert len(infers) == 6 and {c[2] for c in infers} == {"abd-mri_image_3"}
    assert client.labels == {}, "private support / result labels were left on the server"


def test_server_batch_groups_propagation_by_organ(data, tmp_path):
    """Propagation: one batch per organ; each volume is supported by its own saved annotation slice."""
    organs = {"a": 1, "b": 2}
    dataset = EvalDataset(data, organs)
    plan = propagation_plan(dataset.slices, organs, {"all": [0, 1, 2]}, dataset.case_ids)
    client = FakeClient(tmp_path)
    method = ServerMethod("http://fake", "abd-mri", client=client, tmpdir=tmp_path)
    server = run_plan(dataset, plan, lambda f: method, overlay_slices=0, progress=False)
    local = run_plan(dataset, plan, lambda f: CopyMethod(), overlay_slices=0, progress=False)
    assert [r["dice"] for r in server["records"]] == pytest.approx([r["dice"] for r in local["records"]])
    assert [c for c in client.calls if c[0] in ("batch", "infer")] == [
        ("batch", ("abd-mri_image_1", "abd-mri_image_2", "abd-mri_image_3"), None)] * 2
    assert client.labels == {} and method.describe()["batch_requests"] == 2


def test_registration_beats_copy_on_a_shifted_organ():
    yy, xx = np.mgrid[0:64, 0:64]
    blob = lambda cy, cx: np.exp(-(((yy - cy) / 9.0) ** 2 + ((xx - cx) / 7.0) ** 2))   # noqa: E731
    support_image = (0.2 + 0.7 * blob(30, 28))[None].astype(np.float32)
    support_mask = (blob(30, 28) > 0.4)[None]
    query = (0.2 + 0.7 * blob(34, 33))[None].astype(np.float32)
    truth = blob(34, 33) > 0.4
    reg = RegistrationMethod().segment(query, support_image, support_mask)[0]
    copy = CopyMethod().segment(query, support_image, support_mask)[0]
    dice = lambda a: 2 * (a & truth).sum() / (a.sum() + truth.sum())    # noqa: E731
    assert dice(reg) > dice(copy) + 0.1 and dice(reg) > 0.85


def test_chained_registration_follows_an_organ_that_drifts_through_the_volume():
    """--method registration --chain: each slice is registered to its neighbour, so an organ that moves
    2 px and grows a little per slice (28 px and 1.5x over the volume) is followed to both ends; the
    intensity refinement keeps its edges on the organ's."""
    yy, xx = np.mgrid[0:96, 0:96]
    n, z0 = 15, 7
    blobs = [np.exp(-(((yy - 48) / (8 + z / 3)) ** 2 + ((xx - 20 - 2 * z) / (7 + z / 4)) ** 2)) for z in range(n)]
    image = np.stack([0.2 + 0.7 * b for b in blobs], axis=-1).astype(np.float32)
    label = np.stack([b > 0.4 for b in blobs], axis=-1).astype(np.int16)

    class OneVolume:
        def load(self, i):
            return image, label, (1.0, 1.0, 1.0)

    query_z = tuple(z for z in range(n) if z != z0)
    job = Job(fold="all", query=0, organ="a", label=1, scored_z=query_z, groups=(Group(0, z0, query_z),))
    dice = lambda a, z: 2 * (a & (label[..., z] > 0)).sum() / (a.sum() + (label[..., z] > 0).sum())  # noqa: E731
    chained = RegistrationMethod(chain=True).run_group(OneVolume(), job, job.groups[0])
    copied = CopyMethod().run_group(OneVolume(), job, job.groups[0])
    assert chained.shape == (n - 1, 96, 96)
    ends = [0, n - 2]                                     # rows of slices 0 and 14, 7 steps from the annotation
    assert min(dice(chained[i], query_z[i]) for i in ends) > 0.7
    assert max(dice(copied[i], query_z[i]) for i in ends) < 0.3
    assert RegistrationMethod(chain=True).describe()["chain"] is True
    # the intensity refinement (on by default) draws the walk's edges where the organ's values end:
    # without it the drift accumulates towards both ends
    raw = RegistrationMethod(chain=True, intensity=False).run_group(OneVolume(), job, job.groups[0])
    assert min(dice(chained[i], query_z[i]) for i in ends) > 0.85 > max(dice(raw[i], query_z[i]) for i in ends)
    assert RegistrationMethod(chain=True, intensity=False).describe()["intensity_log_odds"] is False
    # the walk steps with the method's own aligner, so its parameters (--method registration's **params)
    # and its failure count reach the chained walk
    method = RegistrationMethod(chain=True, demons_iterations=5)
    calls, warp = [], method.aligner.warp_mask
    method.aligner.warp_mask = lambda *args: calls.append(1) or warp(*args)
    method.run_group(OneVolume(), job, job.groups[0])
    assert len(calls) >= n - 1


# ----------------------------------------------------------------------------- errors
def test_clear_errors_for_malformed_folders(data, tmp_path):
    bad = _write_dataset(tmp_path / "missing", n=3)
    (bad / "label_2.nii.gz").unlink()
    with pytest.raises(DatasetError, match="image_2.nii.gz has no label_2"):
        EvalDataset(bad, {"a": 1})

    bad = _write_dataset(tmp_path / "shape", n=3)
    nib.save(nib.Nifti1Image(np.zeros((H, W, Z + 1), np.int16), np.eye(4)), str(bad / "label_3.nii.gz"))
    with pytest.raises(DatasetError, match=r"label_3.nii.gz has shape \(32, 32, 13\)"):
        EvalDataset(bad, {"a": 1})

    with pytest.raises(DatasetError, match=r"organ label id\(s\) \{'c': 7\}.*ids present: \[1, 2\]"):
        EvalDataset(data, {"a": 1, "c": 7})
    assert main(["--data", str(data), "--organs", "c=7", "--method", "copy", "--out", str(tmp_path / "x")]) == 2


def test_paper_numbers_are_the_papers():
    assert paper_rows("abd-ct", 1)["SD-FSMIS (paper)"]["Mean"] == 83.66
    assert paper_rows("abd-mri", 2)["RPT"]["Liver"] == 76.37
    assert paper_rows("abd-mri", 1, source="abd-ct")["SD-FSMIS (paper)"]["Mean"] == 81.42
    assert "Q-Net" not in paper_rows("abd-ct", 1)
