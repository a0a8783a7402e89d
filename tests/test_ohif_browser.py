"""End to end in a real browser: Orthanc (DICOMweb) + the MONAI Label server with the SD-FSMIS app +
the OHIF viewer bundled with MONAI Label, driven in headless Chromium by Selenium.

A phantom CT study is uploaded to Orthanc with a one-slice DICOM SEG (the radiologist's annotation);
OHIF opens the study in MONAI Label mode, connects to the server, runs `sdfsmis_seg` from the
Auto-Segmentation panel (the support is the SEG in the PACS), and the test checks that the
segmentation is displayed (OHIF's labelmap holds voxels of the organ beyond the annotated slice,
success notification in the DOM) and saves a screenshot in test-artifacts/. It then starts training
from the panel's Active Learning "Update Model" button and checks that the server runs it.

Skips with a reason when Orthanc, its DICOMweb plugin, Chromium, ChromeDriver or selenium are missing
(scripts/ci_system_deps.sh installs the system packages). SDFSMIS_OHIF_TEST_APP names another app
folder to test (default apps/sdfsmis).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
ARTIFACTS = ROOT / "test-artifacts"
APP = Path(os.environ.get("SDFSMIS_OHIF_TEST_APP", ROOT / "apps" / "sdfsmis"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else None)
AFFINE = np.array([[-1.5, 0, 0, 70.0], [0, -1.5, 0, 70.0], [0, 0, 4.0, -40.0], [0, 0, 0, 1]])
ANNOTATED_SLICE = 8


def missing() -> str | None:
    if not (shutil.which("Orthanc") or os.path.exists("/usr/sbin/Orthanc")):
        return "Orthanc is not installed (Debian packages orthanc, orthanc-dicomweb: scripts/ci_system_deps.sh)"
    if not os.path.exists("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"):
        return "the Orthanc DICOMweb plugin is not installed (Debian package orthanc-dicomweb)"
    if not CHROMIUM:
        return "Chromium is not installed (Debian package chromium: scripts/ci_system_deps.sh)"
    if not CHROMEDRIVER:
        return "ChromeDriver is not installed (Debian package chromium-driver: scripts/ci_system_deps.sh)"
    if not shutil.which("curl"):
        return "curl is needed by scripts/orthanc.sh"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    if not (APP / "main.py").exists():
        return f"the MONAI Label app {APP} does not exist yet"
    return None


pytestmark = pytest.mark.skipif(missing() is not None, reason=missing() or "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read().decode())


def wait_until(check, timeout: float, what: str, interval: float = 0.5):
    end = time.time() + timeout
    last = None
    while time.time() < end:
        try:
            value = check()
            if value:
                return value
        except SystemExit:
            raise
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last})")


def phantom():
    """(64, 64, 16) CT-like phantom: body ellipse + a bright 'liver' ellipsoid; its label (liver = 1)."""
    x, y, z = np.meshgrid(np.arange(64), np.arange(64), np.arange(16), indexing="ij")
    body = ((x - 32) / 28.0) ** 2 + ((y - 32) / 22.0) ** 2 <= 1
    liver = ((x - 24) / 12.0) ** 2 + ((y - 30) / 10.0) ** 2 + ((z - 8) / 6.0) ** 2 <= 1
    rng = np.random.default_rng(0)
    vol = np.where(body, 40, -1000) + np.where(liver, 80, 0) + rng.normal(0, 5, x.shape)
    return np.round(vol).astype(np.int16), liver.astype(np.uint8)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Orthanc with the phantom study + its one-slice SEG, and the MONAI Label server on DICOMweb."""
    work = tmp_path_factory.mktemp("ohif")
    orthanc_port, server_port = free_port(), free_port()
    script = ROOT / "scripts" / "orthanc.sh"
    run = subprocess.run(["bash", str(script), "start", str(work / "orthanc"), str(orthanc_port)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr + run.stdout
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"   # dcmqi's itkimage2segimage: no download
    env["MONAI_LABEL_DICOMWEB_CACHE_PATH"] = str(work / "cache")
    env["MONAI_LABEL_DICOMWEB_SEARCH_FILTER"] = json.dumps({"Modality": "CT"})
    server = None
    try:
        url = f"http://127.0.0.1:{orthanc_port}/dicom-web"
        vol, liver = phantom()
        nib.save(nib.Nifti1Image(vol, AFFINE), str(work / "image.nii.gz"))
        nib.save(nib.Nifti1Image(liver, AFFINE), str(work / "label.nii.gz"))

        def cli(*args):
            r = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=ROOT, env=env)
            assert r.returncode == 0, r.stderr
            return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)

        uids = cli("lib.dicom.upload", str(work / "image.nii.gz"), "--series-description", "Phantom CT",
                   "--url", url)
        cli("lib.dicom.upload_seg", str(work / "label.nii.gz"), "--image-series", uids["SeriesInstanceUID"],
            "--url", url, "--keep-slice", str(ANNOTATED_SLICE), "--names", "1=liver")
        log = open(work / "server.log", "w")
        server = subprocess.Popen(
            [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(APP), "--studies", url,
             # untrained tiny weights: their masks are noise, which the intensity gate would rightly drop
             # and a chain would stop at; every slice straight from the annotation shows the workflow
             "--conf", "preset", "tiny", "--conf", "gate", "false", "--conf", "chain", "false",
             "--host", "127.0.0.1", "--port", str(server_port)],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        base = f"http://127.0.0.1:{server_port}"

        def up():
            if server.poll() is not None:
                raise SystemExit(f"exited with code {server.returncode}")
            return get_json(f"{base}/info/")["models"]

        try:
            wait_until(up, 180, "the MONAI Label server")
        except (AssertionError, SystemExit):
            pytest.fail("MONAI Label server did not start; log tail:\n" + (work / "server.log").read_text()[-3000:])
        yield {"base": base, "study": uids["StudyInstanceUID"], "series": uids["SeriesInstanceUID"],
               "liver": liver, "log": work / "server.log"}
    finally:
        if server is not None:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{server_port}/train/", method="DELETE")
                urllib.request.urlopen(req, timeout=10)
            except Exception:
                pass
            os.killpg(server.pid, 15)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, 9)
        subprocess.run(["bash", str(script), "stop", str(work / "orthanc")], capture_output=True, text=True)


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                 "--window-size=1600,1000", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()


LABELMAP_VOXELS_JS = """
const seg = window.services && window.services.segmentationService;
if (!seg) return null;
const vol = seg.getLabelmapVolume('1');
if (!vol || !vol.voxelManager) return null;
const data = vol.voxelManager.getCompleteScalarDataArray();
let n = 0; const slices = new Set();
const dims = vol.dimensions; const per = dims[0] * dims[1];
for (let i = 0; i < data.length; i++) { if (data[i]) { n++; slices.add(Math.floor(i / per)); } }
return {voxels: n, slices: slices.size, dims: dims};
"""


def click_text(driver, tag: str, text: str):
    from selenium.webdriver.common.by import By

    for el in driver.find_elements(By.TAG_NAME, tag):
        if el.text.strip() == text and el.is_displayed():
            driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", el)
            el.click()
            return el
    raise AssertionError(f"no visible <{tag}> with text {text!r}")


def test_ohif_runs_sdfsmis_and_training(stack, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    ARTIFACTS.mkdir(exist_ok=True)
    d = browser
    d.get(f"{stack['base']}/ohif/monai-label?StudyInstanceUIDs={stack['study']}")
    # the study is shown: the viewport canvases render and the MONAI Label panel is there
    wait_until(lambda: d.find_elements(By.ID, "monailabelServerURL"), 120, "OHIF's MONAI Label panel")
    wait_until(lambda: d.execute_script(
        "return document.querySelectorAll('.cornerstone-viewport-element canvas, canvas.cornerstone-canvas').length"),
        120, "the OHIF viewports")
    time.sleep(3)
    field = d.find_element(By.ID, "monailabelServerURL")
    field.clear()
    field.send_keys(stack["base"] + "/")
    d.find_element(By.CSS_SELECTOR, ".settingsTable button.actionButton").click()
    wait_until(lambda: "Auto-Segmentation" in d.find_element(By.CSS_SELECTOR, ".monaiLabelPanel").text, 60,
               "the connection to the MONAI Label server")
    wait_until(lambda: d.execute_script(LABELMAP_VOXELS_JS) is not None, 60, "OHIF's empty labelmap")
    before = d.execute_script(LABELMAP_VOXELS_JS)
    assert before["voxels"] == 0, before

    # Auto-Segmentation tab: choose sdfsmis_seg and Run
    click_text(d, "label", "Auto-Segmentation")
    select = Select(d.find_element(By.CSS_SELECTOR, ".monaiLabelPanel .modelSelector select.selectBox"))
    assert "sdfsmis_seg" in [o.get_attribute("value") for o in select.options]
    select.select_by_value("sdfsmis_seg")
    d.find_element(By.CSS_SELECTOR, ".monaiLabelPanel button[title='Run Segmentation']").click()

    def outcome():
        body = d.find_element(By.TAG_NAME, "body").text
        if "Failed to Run Segmentation" in body:
            return "failed"
        info = d.execute_script(LABELMAP_VOXELS_JS)
        return "ok" if info and info["voxels"] > 0 else None

    result = wait_until(outcome, 300, "the SD-FSMIS result in OHIF")
    if result == "failed":
        log = stack["log"].read_text()[-4000:]
        req = urllib.request.Request(f"{stack['base']}/infer/sdfsmis_seg?image={stack['series']}&output=json",
                                     data=b"", method="POST")
        try:
            detail = urllib.request.urlopen(req, timeout=120).read().decode()
        except urllib.error.HTTPError as err:
            detail = err.read().decode()
        pytest.fail(f"OHIF reported 'Failed to Run Segmentation' ({detail[:500]}); server log tail:\n" + log)
    time.sleep(3)   # let the viewports repaint with the labelmap
    info = d.execute_script(LABELMAP_VOXELS_JS)
    d.save_screenshot(str(ARTIFACTS / "ohif-sdfsmis.png"))
    # the one annotated slice propagated through the volume: more than the annotated slice is labelled
    assert info["slices"] > 1, info
    assert info["voxels"] > int(stack["liver"][:, :, ANNOTATED_SLICE].sum()), info

    # Active Learning tab: "Update Model" starts the sdfsmis trainer on the server
    click_text(d, "label", "Active Learning")
    click_text(d, "button", "Update Model")

    def training_seen():
        status = get_json(f"{stack['base']}/train/")
        return status if isinstance(status, dict) and status.get("status") in ("RUNNING", "DONE", "ERROR") else None

    status = wait_until(training_seen, 60, "the training task started from OHIF")
    assert status.get("status") in ("RUNNING", "DONE"), status
    d.save_screenshot(str(ARTIFACTS / "ohif-sdfsmis-training.png"))
