"""lib/server without a server: names, params, train options, file checks, the datastore, the trainer lock."""
from __future__ import annotations

import gzip
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import psutil
import pytest

from lib.server import trainer_lock
from lib.server.files import check_file, check_same_grid
from lib.server.guard import Scrubber
from lib.server.validate import (ClientError, check_client_params, check_infer_params, check_train_options,
                                 plain_name, upload_name)


def _nii(path, arr, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(arr), np.eye(4) if affine is None else affine), str(path))
    return path


@pytest.mark.parametrize("value", ["/abs/x", "../x", "a/../../b", "..", ".hidden", "x\\y", "~root", "a" * 129, "", None, 5])
def test_ids_must_be_plain_names(value):
    with pytest.raises(ClientError) as err:
        plain_name(value)
    assert err.value.status_code == 400 and "/abs" not in err.value.detail


def test_plain_names_pass():
    assert [plain_name(v) for v in ("case_1", "case 1", "liver.v2", "a" * 128)]


@pytest.mark.parametrize("params", [
    {"ignore_labels": [None]}, {"ignore_labels": [[1]]}, {"ignore_labels": 1.5},
    {"label_info": [{"name": "background_scribbles", "id": "x"}]}, {"label_info": [{"id": [1]}]}, {"label_info": 123},
    {"batch_size": 1e999}, {"threshold": float("nan")}, {"support_image": "../x"}, {"label_tag": "/abs"},
    {"device": "/etc/passwd"},
])
def test_infer_params_that_crashed_the_task_are_400(params):
    with pytest.raises(ClientError) as err:
        check_infer_params(params)
    assert err.value.status_code == 400


def test_good_infer_params_pass_and_server_keys_are_refused():
    check_infer_params({"ignore_labels": "1,2", "label_info": [{"name": "background_scribbles", "id": 4}],
                        "batch_size": "8", "threshold": 0.5, "result_extension": ".nii.gz"})
    for key in ("image", "label", "_sdfsmis_support"):
        with pytest.raises(ClientError, match="server sets"):
            check_client_params({key: "x"})


@pytest.mark.parametrize("opts", [{"iterations": "abc"}, {"init": "xyz"}, {"iterations": 0}, {"lr_new": "x"},
                                  {"device": "tpu"}, {"iterations": float("inf")}, [1]])
def test_bad_train_options_are_400(opts):
    with pytest.raises(ClientError):
        check_train_options(opts)


def test_upload_names():
    assert upload_name("/client/side/case_1.nii.gz") == ("case_1", ".nii.gz")
    for bad in ("x.py", "x.nhdr", "x.hdr", "x.bin", "../.hidden.nii.gz"):
        with pytest.raises(ClientError):
            upload_name(bad)


def test_files_are_checked_from_the_header_and_one_data_stream(tmp_path):
    h = nib.Nifti1Header()
    h.set_data_shape((1000, 1000, 1000))
    h.set_data_dtype(np.float32)
    (tmp_path / "bomb.nii.gz").write_bytes(gzip.compress(h.binaryblock + b"\0" * 4))
    before = psutil.Process().memory_info().rss
    with pytest.raises(ClientError) as err:
        check_file(tmp_path / "bomb.nii.gz", max_voxels=10 ** 6)
    assert err.value.status_code == 413 and "1,000,000,000 voxels" in err.value.detail
    assert psutil.Process().memory_info().rss - before < 200 << 20
    img = _nii(tmp_path / "img.nii.gz", np.random.default_rng(0).random((40, 40, 10)).astype(np.float32))
    raw = img.read_bytes()
    for cut in (2, 10):
        (tmp_path / "cut.nii.gz").write_bytes(raw[: len(raw) // cut])
        with pytest.raises(ClientError, match="cut short"):
            check_file(tmp_path / "cut.nii.gz")
    nan = np.zeros((40, 40, 10), np.float32)
    nan[3, 3, 3] = np.nan
    with pytest.raises(ClientError, match="NaN"):
        check_file(_nii(tmp_path / "nan.nii.gz", nan))
    (tmp_path / "det.nrrd").write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 2 2 2\nencoding: raw\n"
                                        b"data file: /etc/hostname\n\n")
    with pytest.raises(ClientError, match="detached"):
        check_file(tmp_path / "det.nrrd")
    assert check_file(img).size == (40, 40, 10)


def test_a_label_must_lie_on_the_image_grid(tmp_path):
    label = np.zeros((40, 40, 10), np.uint8)
    image = check_file(_nii(tmp_path / "i.nii.gz", label))
    shifted = np.eye(4)
    shifted[:3, 3] = 1000
    for affine, words in ((np.diag([2, 2, 2, 1.0]), "spacing"), (shifted, "origin"),
                          (np.diag([-1, 1, 1, 1.0]), "direction")):
        with pytest.raises(ClientError, match=words):
            check_same_grid(check_file(_nii(tmp_path / "l.nii.gz", label, affine)), image)
    with pytest.raises(ClientError, match="differs from the image shape"):
        check_same_grid(check_file(_nii(tmp_path / "s.nii.gz", label[:20])), image)
    check_same_grid(check_file(_nii(tmp_path / "ok.nii.gz", label)), image)


def test_the_datastore_stays_inside_the_studies(tmp_path):
    from lib.server.datastore import safe_datastore

    studies = tmp_path / "studies"
    studies.mkdir()
    outside = _nii(tmp_path / "outside.nii.gz", np.zeros((8, 8, 4), np.float32))
    (studies / "link.nii.gz").symlink_to(outside)
    ds = safe_datastore(str(studies), max_voxels=10 ** 6)
    upload = _nii(tmp_path / "up.nii.gz", np.zeros((8, 8, 4), np.float32))
    for bad in ("../x", str(tmp_path / "x")):
        with pytest.raises(ClientError):
            ds.add_image(bad, str(upload), {})
    assert ds.add_image("case", str(upload), {}) == "case"
    with pytest.raises(ClientError):
        ds.save_label("case", str(upload), "../../x", {})
    with pytest.raises(ClientError) as err:
        ds.get_image_uri("link")              # a link out of the studies folder
    assert "outside" in err.value.detail
    with pytest.raises(ClientError) as err:
        ds.remove_image("nope")
    assert err.value.status_code == 404
    assert outside.exists() and "path" not in ds.get_image_info("case")


def test_one_trainer_at_a_time_and_orphans_are_stopped(tmp_path):
    trainer_lock.acquire(tmp_path)
    assert trainer_lock.owner(tmp_path) == psutil.Process().pid
    trainer_lock.release(tmp_path)
    assert trainer_lock.owner(tmp_path) is None
    # a process that is not our child, like a trainer whose server was killed (-9)
    out = subprocess.run(["sh", "-c", f"'{sys.executable}' -c 'import time; time.sleep(60)' >/dev/null 2>&1 & echo $!"],
                         capture_output=True, text=True, check=True)
    p = psutil.Process(int(out.stdout))
    (tmp_path / "trainer.lock").write_text(json.dumps({"pid": p.pid, "started": p.create_time()}))
    with pytest.raises(RuntimeError, match=f"pid {p.pid}"):
        trainer_lock.acquire(tmp_path)
    (tmp_path / "trainer.lock").write_text(json.dumps({"pid": p.pid, "started": p.create_time() - 100}))
    assert trainer_lock.owner(tmp_path) is None          # a reused pid is not the owner: the lock is stale
    trainer_lock.acquire(tmp_path)
    trainer_lock.release(tmp_path)
    (tmp_path / "trainer.lock").write_text(json.dumps({"pid": p.pid, "started": p.create_time()}))
    assert trainer_lock.stop_orphan(tmp_path, wait_s=10) == p.pid
    assert not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    assert not (tmp_path / "trainer.lock").exists()


def test_cross_volume_support_of_another_slice_size_is_resampled():
    from lib.transforms.align import SliceAligner

    y, x = np.mgrid[:64, :64]
    query = (((x - 30) ** 2 + (y - 34) ** 2) < 200).astype(np.float32)
    ys, xs = np.mgrid[:96, :80]
    mask = ((xs - 40) ** 2 / 1.56 + (ys - 48) ** 2 / 2.25) < 200
    image, warped = SliceAligner().align(query, mask.astype(np.float32), mask)
    assert image.shape == warped.shape == query.shape and warped.any()


def test_the_scrubber_hides_server_folders():
    s = Scrubber({"/srv/app/model/trained": "<train_dir>", "/srv/app": "<app>"})
    assert s(b'{"c": "/srv/app/model/trained/model", "d": "/srv/app/x"}') == b'{"c": "<train_dir>/model", "d": "<app>/x"}'


def test_an_upload_waits_for_the_watchers_reconcile(tmp_path, monkeypatch):
    """The file watcher's reconcile iterates the index; an upload from a request thread must not change it
    meanwhile (it did: "dictionary changed size during iteration" killed the watcher)."""
    import threading

    from monailabel.datastore.local import LocalDatastore

    from lib.server.datastore import safe_datastore

    studies = tmp_path / "studies"
    studies.mkdir()
    for i in range(2):
        _nii(studies / f"a{i}.nii.gz", np.zeros((8, 8, 4), np.float32))
    ds = safe_datastore(str(studies), max_voxels=10 ** 6)
    inside, go, errors = threading.Event(), threading.Event(), []
    filename = LocalDatastore._filename

    def slow_filename(self, *args):          # the reconcile pauses inside its loop over the index
        if threading.current_thread().name == "reconcile" and not inside.is_set():
            inside.set()
            go.wait(10)
        return filename(self, *args)

    def reconcile():
        try:
            ds.refresh()
        except Exception as e:               # noqa: BLE001 - the test reports it
            errors.append(e)

    monkeypatch.setattr(LocalDatastore, "_filename", slow_filename)
    watcher = threading.Thread(target=reconcile, name="reconcile")
    watcher.start()
    assert inside.wait(10)
    upload = threading.Thread(target=ds.add_image, args=("b", _nii(tmp_path / "b.nii.gz", np.zeros((8, 8, 4), np.float32)), {}))
    upload.start()
    upload.join(0.5)
    blocked = upload.is_alive()
    go.set()
    watcher.join(10)
    upload.join(10)
    assert blocked and not errors, errors
    assert set(ds.list_images()) == {"a0", "a1", "b"}
