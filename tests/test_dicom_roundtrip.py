"""DICOM round trips: NIfTI -> DICOM series (-> Orthanc -> MONAI Label's DICOMweb datastore) -> same
array and spacing; label -> DICOM SEG -> label. The file conversions always run; the Orthanc part
runs when Orthanc and its DICOMweb plugin are installed (Debian: orthanc, orthanc-dicomweb)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from lib.dicom import (
    GeometryError,
    SegError,
    SeriesError,
    label_on_image_grid,
    label_to_seg,
    read_series,
    reference_image,
    seg_to_label,
    series_affine,
    slice_geometry,
    volume_to_datasets,
    write_datasets,
)
from lib.dicom.seg import image_to_array

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
# a right-handed CT-like grid (abd-ct style) and a left-handed MRI-like grid (abd-mri style)
CT_AFFINE = np.array([[-1.2, 0, 0, 10.0], [0, -1.2, 0, -5.0], [0, 0, 3.0, 2.0], [0, 0, 0, 1]])
MR_AFFINE = np.array([[-1.25, 0, 0, 192.6], [0, 1.25, 0, -200.6], [0, 0, 7.7, -77.1], [0, 0, 0, 1]])


def rotation(a, b, c):
    ca, sa, cb, sb, cc, sc = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(c), np.sin(c)
    rx = np.array([[1, 0, 0], [0, ca, -sa], [0, sa, ca]])
    ry = np.array([[cb, 0, sb], [0, 1, 0], [-sb, 0, cb]])
    rz = np.array([[cc, -sc, 0], [sc, cc, 0], [0, 0, 1]])
    return rz @ ry @ rx


def oblique_affine():
    aff = np.eye(4)
    aff[:3, :3] = rotation(0.2, -0.3, 0.5) @ np.diag([0.8, 0.9, 2.5])
    aff[:3, 3] = [12.0, -7.0, 30.0]
    return aff


def ct_volume(shape=(20, 24, 7), seed=0):
    return np.random.default_rng(seed).integers(-1000, 1500, shape).astype(np.int16)


def canonical(arr, affine):
    img = nib.as_closest_canonical(nib.Nifti1Image(arr, affine))
    return np.asarray(img.dataobj), img.affine


# ----------------------------------------------------------------------------- geometry

def test_geometry_lps_conventions():
    """RAS +x (towards the right) is LPS -x: an identity NIfTI affine gives row direction (-1, 0, 0)."""
    geom = slice_geometry(np.eye(4), 3)
    assert geom.orientation == (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0)
    np.testing.assert_allclose(geom.positions[2], [0, 0, 2])
    aff = np.diag([2.0, 3.0, 4.0, 1.0])
    aff[:3, 3] = [10, 20, 30]
    geom = slice_geometry(aff, 5)
    assert geom.pixel_spacing == (3.0, 2.0)          # [row spacing (j), column spacing (i)]
    assert geom.slice_spacing == 4.0
    np.testing.assert_allclose(geom.positions[0], [-10, -20, 30])  # LPS


@pytest.mark.parametrize("affine", [CT_AFFINE, MR_AFFINE, oblique_affine()], ids=["ct", "mri-left-handed", "oblique"])
def test_geometry_inverse(affine):
    geom = slice_geometry(affine, 6)
    back = series_affine(geom.orientation, geom.positions, geom.pixel_spacing)
    np.testing.assert_allclose(back, affine, atol=1e-9)


def test_geometry_rejects_sheared_affine():
    aff = np.eye(4)
    aff[0, 1] = 0.5
    with pytest.raises(GeometryError, match="not orthogonal"):
        slice_geometry(aff, 3)
    with pytest.raises(GeometryError, match="singular"):
        slice_geometry(np.diag([1.0, 1.0, 0.0, 1.0]), 3)


# ----------------------------------------------------------------------------- series files

@pytest.mark.parametrize("affine", [CT_AFFINE, oblique_affine()], ids=["ct", "oblique"])
def test_series_files_roundtrip_same_array(tmp_path, affine):
    vol = ct_volume()
    write_datasets(volume_to_datasets(vol, affine, modality="CT"), tmp_path)
    img = read_series(tmp_path)
    np.testing.assert_array_equal(image_to_array(img), vol)
    out = tmp_path / "back.nii.gz"
    sitk.WriteImage(img, str(out))   # what MONAI Label's DICOMweb datastore does with a series
    back = nib.load(str(out))
    np.testing.assert_array_equal(np.asarray(back.dataobj), vol)
    np.testing.assert_allclose(back.affine, affine, atol=1e-4)
    np.testing.assert_allclose(back.header.get_zooms()[:3], np.linalg.norm(affine[:3, :3], axis=0), atol=1e-5)


def test_series_left_handed_keeps_physical_positions(tmp_path):
    """A left-handed NIfTI (abd-mri style): readers stack slices along the plane normal, so the array
    comes back with the slice axis reversed, every voxel at the same place in the patient."""
    vol = np.random.default_rng(1).random((16, 18, 6)).astype(np.float32)
    ds = volume_to_datasets(vol, MR_AFFINE, modality="MR")
    assert ds[0].Modality == "MR" and ds[0].SOPClassUID == "1.2.840.10008.5.1.4.1.1.4"
    write_datasets(ds, tmp_path)
    img = read_series(tmp_path)
    out = tmp_path / "back.nii.gz"
    sitk.WriteImage(img, str(out))
    back = nib.load(str(out))
    slope = float(ds[0].RescaleSlope)
    a, aff_a = canonical(vol, MR_AFFINE)
    b, aff_b = canonical(np.asarray(back.dataobj), back.affine)
    np.testing.assert_allclose(aff_b, aff_a, atol=1e-4)
    assert np.abs(b - a).max() <= slope / 2 + 1e-6      # float MR values to within the rescale step
    np.testing.assert_allclose(np.asarray(back.dataobj), vol[:, :, ::-1], atol=slope / 2 + 1e-6)


def test_series_attributes(tmp_path):
    ds = volume_to_datasets(ct_volume(), CT_AFFINE, series_description="Abd CT 0", patient_id="P7",
                            series_uid="1.2.3.4.5")
    assert len(ds) == 7 and len({d.SOPInstanceUID for d in ds}) == 7
    assert {d.SeriesInstanceUID for d in ds} == {"1.2.3.4.5"} and len({d.StudyInstanceUID for d in ds}) == 1
    assert ds[0].SeriesDescription == "Abd CT 0" and ds[0].PatientID == "P7"
    assert ds[0].Rows == 24 and ds[0].Columns == 20 and ds[0].PixelRepresentation == 1
    assert [float(x) for x in ds[0].PixelSpacing] == [1.2, 1.2] and float(ds[0].SliceThickness) == 3.0
    again = volume_to_datasets(ct_volume(), CT_AFFINE, series_uid="1.2.3.4.5")
    assert [d.SOPInstanceUID for d in again] == [d.SOPInstanceUID for d in ds]   # deterministic
    path = write_datasets(ds[:1], tmp_path)[0]
    assert path.read_bytes()[128:132] == b"DICM"                                 # Part 10 file
    assert pydicom.dcmread(str(path)).pixel_array.shape == (24, 20)


def test_series_bad_input(tmp_path):
    with pytest.raises(SeriesError, match="modality must be one of"):
        volume_to_datasets(ct_volume(), CT_AFFINE, modality="US")
    with pytest.raises(SeriesError, match="3D"):
        volume_to_datasets(np.zeros((4, 4)), CT_AFFINE)
    with pytest.raises(SeriesError, match="NaN"):
        volume_to_datasets(np.full((4, 4, 2), np.nan), CT_AFFINE)
    from lib.dicom import nifti_to_datasets
    with pytest.raises(SeriesError, match="not found: .*missing.nii.gz"):
        nifti_to_datasets(tmp_path / "missing.nii.gz")


# ----------------------------------------------------------------------------- SEG

def one_slice_label(shape=(20, 24, 7), k=3):
    lab = np.zeros(shape, np.uint8)
    lab[4:12, 5:15, k] = 1
    lab[14:18, 2:6, k] = 2
    return lab


def test_seg_roundtrip_one_slice(tmp_path):
    src = volume_to_datasets(ct_volume(), CT_AFFINE)
    lab = one_slice_label()
    seg = label_to_seg(lab, src, {1: "liver", 2: "spleen"})
    assert seg.Modality == "SEG" and int(seg.NumberOfFrames) == 2        # one frame per segment, slice 3 only
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == src[0].SeriesInstanceUID
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["liver", "spleen"]
    ref = reference_image(src)
    np.testing.assert_array_equal(seg_to_label(seg, ref), lab)
    seg.save_as(str(tmp_path / "seg.dcm"), write_like_original=False)
    np.testing.assert_array_equal(seg_to_label(tmp_path / "seg.dcm", ref), lab)


def test_seg_as_monailabel_reads_it(tmp_path):
    """MONAI Label's DICOMweb datastore turns a SEG into a one-slice .seg.nrrd; put it back on the image grid."""
    from monailabel.datastore.utils.convert import dicom_seg_to_itk_image

    vol = ct_volume()
    write_datasets(volume_to_datasets(vol, CT_AFFINE), tmp_path / "series")
    src = [pydicom.dcmread(str(p)) for p in sorted((tmp_path / "series").iterdir())]
    lab = one_slice_label(k=5)
    seg_dir = tmp_path / "seg"
    seg_dir.mkdir()
    label_to_seg(lab, src).save_as(str(seg_dir / "seg.dcm"), write_like_original=False)
    nrrd = dicom_seg_to_itk_image(str(seg_dir))
    assert sitk.ReadImage(nrrd).GetSize()[2] == 1                     # only the annotated slice
    image_nii = tmp_path / "image.nii.gz"
    sitk.WriteImage(read_series(tmp_path / "series"), str(image_nii))
    np.testing.assert_array_equal(label_on_image_grid(nrrd, image_nii), lab)


def test_seg_from_nifti_label_on_left_handed_grid(tmp_path):
    """A label file in the NIfTI's own grid is resampled onto the series by position."""
    vol = np.random.default_rng(2).random((16, 18, 6)).astype(np.float32)
    src = volume_to_datasets(vol, MR_AFFINE, modality="MR")
    lab = np.zeros(vol.shape, np.uint8)
    lab[3:9, 4:10, 1] = 4
    path = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(lab, MR_AFFINE), str(path))
    seg = label_to_seg(sitk.ReadImage(str(path)), src)
    np.testing.assert_array_equal(seg_to_label(seg, reference_image(src)), lab[:, :, ::-1])


def test_seg_bad_input():
    src = volume_to_datasets(ct_volume(), CT_AFFINE)
    with pytest.raises(SegError, match="empty"):
        label_to_seg(np.zeros((20, 24, 7), np.uint8), src)
    with pytest.raises(SegError, match="does not match the image grid"):
        label_to_seg(np.ones((20, 24, 6), np.uint8), src)
    with pytest.raises(SegError, match="not a DICOM SEG"):
        seg_to_label(src[0], reference_image(src))


def dcmqi_env():
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.mark.skipif(shutil.which("itkimage2segimage", path=str(VENV_BIN)) is None and shutil.which("itkimage2segimage") is None,
                    reason="dcmqi (pip install dcmqi) is not installed: MONAI Label's SEG writer needs itkimage2segimage")
def test_monailabel_dcmqi_seg_writer_offline(tmp_path, monkeypatch):
    """The server's own label -> SEG path (infer output=dicom_seg, saving a `final` label) runs offline."""
    from monailabel.datastore.utils.convert import nifti_to_dicom_seg

    monkeypatch.setenv("PATH", dcmqi_env()["PATH"])
    vol = ct_volume()
    write_datasets(volume_to_datasets(vol, CT_AFFINE), tmp_path / "series")
    image = read_series(tmp_path / "series")
    lab = one_slice_label()
    lab[6:10, 8:12, 4] = 1
    label_path = tmp_path / "result.nii.gz"
    out = sitk.GetImageFromArray(np.ascontiguousarray(lab.transpose(2, 1, 0)))
    out.CopyInformation(image)
    sitk.WriteImage(out, str(label_path))
    seg_file = nifti_to_dicom_seg(str(tmp_path / "series"), str(label_path),
                                  [{"name": "liver"}, {"name": "spleen"}], use_itk=True)
    assert seg_file and os.path.getsize(seg_file) > 0, "itkimage2segimage wrote no SEG"
    np.testing.assert_array_equal(seg_to_label(seg_file, image), lab)


# ----------------------------------------------------------------------------- Orthanc + MONAI Label datastore

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def orthanc_missing() -> str | None:
    if not (shutil.which("Orthanc") or os.path.exists("/usr/sbin/Orthanc")):
        return "Orthanc is not installed (Debian packages orthanc, orthanc-dicomweb; scripts/ci_system_deps.sh)"
    if not os.path.exists("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"):
        return "the Orthanc DICOMweb plugin is not installed (Debian package orthanc-dicomweb)"
    if not shutil.which("curl"):
        return "curl is needed by scripts/orthanc.sh"
    return None


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """A private Orthanc on a free loopback port; yields its DICOMweb URL; stopped at teardown."""
    reason = orthanc_missing()
    if reason:
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("orthanc")
    port = free_port()
    script = ROOT / "scripts" / "orthanc.sh"
    run = subprocess.run(["bash", str(script), "start", str(folder), str(port)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr + run.stdout
    try:
        yield f"http://127.0.0.1:{port}/dicom-web"
    finally:
        subprocess.run(["bash", str(script), "stop", str(folder)], capture_output=True, text=True)


def cli(*args):
    run = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=ROOT, env=dcmqi_env())
    assert run.returncode == 0, run.stderr
    return dict(line.split("=", 1) for line in run.stdout.splitlines() if "=" in line)


def dicomweb_datastore(url, cache):
    from monailabel.datastore.dicom import DICOMWebDatastore, DICOMwebClientX

    client = DICOMwebClientX(url=url, session=None, qido_url_prefix=None, wado_url_prefix=None, stow_url_prefix=None)
    return DICOMWebDatastore(client, {"Modality": "CT"}, cache_path=str(cache))


def test_orthanc_upload_datastore_and_seg_support(orthanc, tmp_path):
    from lib.dicom.datastore import saved_label, saved_label_path

    vol = ct_volume((24, 20, 9), seed=3)
    gt = np.zeros(vol.shape, np.uint8)
    gt[5:15, 4:12, 2:7] = 1
    nib.save(nib.Nifti1Image(vol, CT_AFFINE), str(tmp_path / "image_0.nii.gz"))
    nib.save(nib.Nifti1Image(gt, CT_AFFINE), str(tmp_path / "label_0.nii.gz"))

    uids = cli("lib.dicom.upload", str(tmp_path / "image_0.nii.gz"), "--series-description", "test CT",
               "--url", orthanc)
    series = uids["SeriesInstanceUID"]
    ds = dicomweb_datastore(orthanc, tmp_path / "cache")
    assert series in ds.list_images()
    assert saved_label_path(ds, series) is None                      # nothing annotated yet

    image = nib.load(ds.get_image_uri(series))                        # datastore image (NIfTI from the series)
    np.testing.assert_array_equal(np.asarray(image.dataobj), vol)
    np.testing.assert_allclose(image.header.get_zooms()[:3], (1.2, 1.2, 3.0), atol=1e-6)
    np.testing.assert_allclose(image.affine, CT_AFFINE, atol=1e-4)

    # the radiologist's one-slice annotation, stored to the PACS as a SEG
    cli("lib.dicom.upload_seg", str(tmp_path / "label_0.nii.gz"), "--image-series", series, "--url", orthanc,
        "--keep-slice", "4", "--names", "1=liver")
    label = saved_label(ds, series)
    expected = np.zeros_like(gt)
    expected[:, :, 4] = gt[:, :, 4]
    np.testing.assert_array_equal(label, expected)
    # MONAI Label's own view: the image now counts as labeled (final) and is in the training datalist
    assert series in ds.get_labeled_images()
    assert [d["image"] for d in ds.datalist()] == [ds.get_image_uri(series)]


@pytest.mark.skipif(shutil.which("itkimage2segimage", path=str(VENV_BIN)) is None and shutil.which("itkimage2segimage") is None,
                    reason="dcmqi (pip install dcmqi) is not installed")
def test_orthanc_save_final_label_goes_to_pacs(orthanc, tmp_path, monkeypatch):
    """PUT /datastore/label?tag=final on a DICOMweb datastore: MONAI Label writes a SEG (dcmqi) to Orthanc."""
    from lib.dicom.web import make_client, seg_series_for

    monkeypatch.setenv("PATH", dcmqi_env()["PATH"])
    vol = ct_volume((20, 22, 6), seed=4)
    nib.save(nib.Nifti1Image(vol, CT_AFFINE), str(tmp_path / "image.nii.gz"))
    series = cli("lib.dicom.upload", str(tmp_path / "image.nii.gz"), "--url", orthanc)["SeriesInstanceUID"]
    ds = dicomweb_datastore(orthanc, tmp_path / "cache")
    image_path = ds.get_image_uri(series)
    lab = np.zeros(vol.shape, np.uint8)
    lab[3:9, 4:12, 2] = 1
    ref = nib.load(image_path)
    nib.save(nib.Nifti1Image(lab, ref.affine), str(tmp_path / "result.nii.gz"))
    ds.save_label(series, str(tmp_path / "result.nii.gz"), "final", {"label_info": [{"name": "liver"}]})
    segs = seg_series_for(make_client(orthanc), series)
    assert len(segs) == 1
    fresh = dicomweb_datastore(orthanc, tmp_path / "cache2")         # a second server reading the PACS
    from lib.dicom.datastore import saved_label
    np.testing.assert_array_equal(saved_label(fresh, series), lab)
