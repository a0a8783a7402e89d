"""End to end in a real browser: Orthanc (DICOMweb) + the MONAI Label server with the SD-FSMIS app +
the OHIF viewer bundled with MONAI Label, driven in headless Chromium by Selenium.

A phantom CT study is uploaded to Orthanc with a one-slice DICOM SEG (the radiologist's annotation);
OHIF opens the study in MONAI Label mode, connects to the server, runs `sdfsmis_seg` from the
Auto-Segmentation panel (the support is the SEG in the PACS) with the app's default model (the
embedded checkpoint) and settings, and the test checks that OHIF's labelmap agrees with the
phantom's organ on the slices around the annotated one (Dice per slice), and saves a screenshot in
test-artifacts/. It then starts training from the panel's Active Learning "Update Model" button and
checks that the server runs it.

OHIF re-renders its panels at any time (a newer Chromium re-renders the MONAI Label panel when the
server URL field is cleared), so the test never holds on to an element: every action re-finds its
element and is retried until a deadline. The server URL reaches the panel as the cookie the panel
itself reads (MONAILABEL_SERVER_URL), set before the page loads. On failure a screenshot, the page
text, the browser console log and the server log tail are saved under test-artifacts/.

Skips with a reason when Orthanc, its DICOMweb plugin, Chromium, ChromeDriver or selenium are missing
(scripts/ci_system_deps.sh installs the system packages). SDFSMIS_OHIF_TEST_APP names another app
folder to test (default apps/sdfsmis). SDFSMIS_OHIF_STUDY="image.nii.gz:label.nii.gz:6=liver,1=spleen"
runs the same workflow on a real CT volume instead of the phantom (the listed label values are the
organs, annotated on the slice where they cover the largest area together, in a 36-slice volume cut
around it; the README screenshot is made this way, docs/ohif.md).
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
import urllib.parse
import urllib.request
from contextlib import contextmanager
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
STUDY = os.environ.get("SDFSMIS_OHIF_STUDY")
STUDY_SLICES = 36


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


def study(work: Path):
    """-> (image file, label file, bool (X, Y, Z) truth of the organs, annotated slice, upload_seg args):
    the phantom, or the real volume named by SDFSMIS_OHIF_STUDY."""
    if not STUDY:
        vol, liver = phantom()
        nib.save(nib.Nifti1Image(vol, AFFINE), str(work / "image.nii.gz"))
        nib.save(nib.Nifti1Image(liver, AFFINE), str(work / "label.nii.gz"))
        return work / "image.nii.gz", work / "label.nii.gz", liver.astype(bool), ANNOTATED_SLICE, ["--names", "1=liver"]
    image, label, organs = STUDY.split(":")
    values = [int(part.split("=")[0]) for part in organs.split(",")]
    img, lbl = nib.load(image), nib.load(label)
    truth = np.isin(np.asarray(lbl.dataobj), values)
    annotated = int(np.argmax(truth.sum(axis=(0, 1))))
    lo = int(np.clip(annotated - STUDY_SLICES // 2, 0, max(truth.shape[2] - STUDY_SLICES, 0)))
    keep = slice(lo, lo + STUDY_SLICES)    # a volume of STUDY_SLICES slices around the annotation
    nib.save(img.slicer[:, :, keep], str(work / "image.nii.gz"))
    nib.save(lbl.slicer[:, :, keep], str(work / "label.nii.gz"))
    mapping = ",".join(f"{v}={i + 1}" for i, v in enumerate(values))
    names = ",".join(f"{i + 1}={part.split('=')[1]}" for i, part in enumerate(organs.split(",")))
    return (work / "image.nii.gz", work / "label.nii.gz", truth[..., keep], annotated - lo,
            ["--labels", ",".join(map(str, values)), "--map", mapping, "--names", names])


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
    env["SDFSMIS_PSEUDOLABEL_CACHE"] = str(work / "pseudolabels")   # the trainer's cache, not the user's
    server = None
    try:
        url = f"http://127.0.0.1:{orthanc_port}/dicom-web"

        def cli(*args):
            r = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=ROOT, env=env)
            assert r.returncode == 0, r.stderr
            return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)

        image, label, truth, annotated, seg_args = study(work)
        uids = cli("lib.dicom.upload", str(image), "--series-description", "Phantom CT" if not STUDY else "Abdominal CT",
                   "--modality", "CT", "--url", url)
        cli("lib.dicom.upload_seg", str(label), "--image-series", uids["SeriesInstanceUID"],
            "--url", url, "--keep-slice", str(annotated), *seg_args)
        log = open(work / "server.log", "w")
        server = subprocess.Popen(
            [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(APP), "--studies", url,
             "--host", "127.0.0.1", "--port", str(server_port),
             "--conf", "train_dir", str(work / "train")],   # "Update Model" must not publish into the app's model/
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
               "truth": truth, "annotated": annotated, "log": work / "server.log", "train_dir": work / "train"}
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


LABELMAP_JS = """
const seg = window.services && window.services.segmentationService;
if (!seg) return null;
const vol = seg.getLabelmapVolume('1');
if (!vol || !vol.voxelManager) return null;
const data = vol.voxelManager.getCompleteScalarDataArray();
const dims = vol.dimensions; const per = dims[0] * dims[1];
const z0 = arguments[0], z1 = arguments[1];
const counts = new Array(dims[2]).fill(0); let bits = '';
for (let i = 0; i < data.length; i++) {
  const z = Math.floor(i / per);
  if (data[i]) counts[z]++;
  if (z >= z0 && z <= z1) bits += data[i] ? '1' : '0';
}
const n = counts.reduce((a, b) => a + b, 0);
return {voxels: n, slices: counts.filter(c => c > 0).length, dims: dims, counts: counts, bits: bits};
"""
RETRYABLE = ("StaleElementReferenceException", "NoSuchElementException", "ElementClickInterceptedException",
             "ElementNotInteractableException", "JavascriptException")


def retry(action, timeout: float, what: str, interval: float = 0.5):
    """Run `action` until it returns a truthy value, retrying while OHIF re-renders (stale or missing
    elements) and while it returns a falsy value, up to `timeout` seconds."""
    end, last = time.time() + timeout, None
    while time.time() < end:
        try:
            value = action()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - only the re-rendering kinds are retried
            if type(exc).__name__ not in RETRYABLE:
                raise
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last error: {type(last).__name__ if last else None})")


@contextmanager
def artifacts_on_failure(driver, server_log: Path, name: str):
    """On any failure inside, save a screenshot, the page text, the browser console log and the server
    log tail under test-artifacts/ (named `name`-*), then re-raise."""
    try:
        yield
    except BaseException:
        ARTIFACTS.mkdir(exist_ok=True)
        for what, save in (
            ("screenshot", lambda: driver.save_screenshot(str(ARTIFACTS / f"{name}-failure.png"))),
            ("page text", lambda: (ARTIFACTS / f"{name}-page.txt").write_text(
                driver.execute_script("return document.body ? document.body.innerText : ''") or "")),
            ("console", lambda: (ARTIFACTS / f"{name}-console.log").write_text("\n".join(
                f"{e.get('level')} {e.get('message')}" for e in driver.get_log("browser")))),
            ("server log", lambda: (ARTIFACTS / f"{name}-server.log").write_text(server_log.read_text()[-20000:])),
        ):
            try:
                save()
            except Exception as exc:  # noqa: BLE001 - keep the original failure
                print(f"could not save the {what}: {exc}")
        raise


def click_text(driver, tag: str, text: str) -> bool:
    """Click the visible <tag> whose text is `text`; False when there is none (yet)."""
    from selenium.webdriver.common.by import By

    for el in driver.find_elements(By.TAG_NAME, tag):
        if el.text.strip() == text and el.is_displayed():
            driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", el)
            el.click()
            return True
    return False


def connect(d, base: str) -> None:
    """Point OHIF's MONAI Label panel at `base` and press Connect, tolerating re-renders."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url = base + "/"

    def field_value():
        return d.find_element(By.ID, "monailabelServerURL").get_attribute("value")

    if retry(field_value, 30, "the server URL field") != url:
        # the cookie did not reach the panel: type over the old URL (select-all, no clear(), which
        # makes the panel re-render without the field)
        def type_url():
            field = d.find_element(By.ID, "monailabelServerURL")
            field.send_keys(Keys.CONTROL, "a")
            field.send_keys(url)
            return field_value() == url
        retry(type_url, 30, "the server URL typed into the panel")

    def press_connect():
        d.find_element(By.CSS_SELECTOR, ".settingsTable button.actionButton").click()
        return True

    def connected():
        return "Auto-Segmentation" in d.find_element(By.CSS_SELECTOR, ".monaiLabelPanel").text

    end = time.time() + 90
    while True:   # a click lost in a re-render is pressed again
        retry(press_connect, 30, "the Connect button")
        try:
            retry(connected, 15, "the connection to the MONAI Label server")
            return
        except AssertionError:
            if time.time() > end:
                raise


def labelmap_masks(d, z0: int, z1: int) -> tuple[np.ndarray, np.ndarray]:
    """OHIF's labelmap -> (bool (X, Y, z1 - z0 + 1) of slices z0..z1, labelled voxels per slice (Z,)), in
    the NIfTI's voxel order (its DICOM series keeps it: columns = first axis, rows = second, slices = third)."""
    info = d.execute_script(LABELMAP_JS, z0, z1)
    bits = np.frombuffer(info["bits"].encode(), dtype=np.uint8) == ord("1")
    cols, rows, _ = info["dims"]
    return bits.reshape(z1 - z0 + 1, rows, cols).transpose(2, 1, 0), np.asarray(info["counts"])


def slice_dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def test_ohif_runs_sdfsmis_and_training(stack, browser):
    ARTIFACTS.mkdir(exist_ok=True)
    with artifacts_on_failure(browser, stack["log"], "ohif"):
        run_workflow(browser, stack)


def run_workflow(d, stack):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    base = stack["base"]
    # the panel reads its server URL from this cookie (escape()d) when it mounts: set it first
    d.get(f"{base}/info/")
    d.add_cookie({"name": "MONAILABEL_SERVER_URL", "value": urllib.parse.quote(base + "/", safe="/"), "path": "/"})
    d.get(f"{base}/ohif/monai-label?StudyInstanceUIDs={stack['study']}")
    # the study is shown: the viewport canvases render and the MONAI Label panel is there
    retry(lambda: d.find_elements(By.ID, "monailabelServerURL"), 120, "OHIF's MONAI Label panel")
    retry(lambda: d.execute_script(
        "return document.querySelectorAll('.cornerstone-viewport-element canvas, canvas.cornerstone-canvas').length"),
        120, "the OHIF viewports")
    connect(d, base)
    before = retry(lambda: d.execute_script(LABELMAP_JS, 0, -1), 60, "OHIF's empty labelmap")
    assert before["voxels"] == 0, before

    # Auto-Segmentation tab: choose sdfsmis_seg and Run
    retry(lambda: click_text(d, "label", "Auto-Segmentation"), 30, "the Auto-Segmentation tab")

    def choose_model():
        select = Select(d.find_element(By.CSS_SELECTOR, ".monaiLabelPanel .modelSelector select.selectBox"))
        if "sdfsmis_seg" not in [o.get_attribute("value") for o in select.options]:
            return False
        select.select_by_value("sdfsmis_seg")
        return select.first_selected_option.get_attribute("value") == "sdfsmis_seg"

    retry(choose_model, 30, "sdfsmis_seg in the model selector")

    def infer_requests() -> int:
        return stack["log"].read_text().count("Infer Request")

    def run_clicked():
        """Press Run; True once the server got the request (a click lost while OHIF is still loading
        the volume is pressed again)."""
        sent = infer_requests()
        d.find_element(By.CSS_SELECTOR, ".monaiLabelPanel button[title='Run Segmentation']").click()
        end = time.time() + 20
        while time.time() < end:
            if infer_requests() > sent:
                return True
            time.sleep(0.5)
        return False

    retry(run_clicked, 120, "the infer request sent by OHIF's Run Segmentation button")

    def outcome():
        if "Failed to Run Segmentation" in d.find_element(By.TAG_NAME, "body").text:
            return "failed"
        info = d.execute_script(LABELMAP_JS, 0, -1)
        return "ok" if info and info["voxels"] > 0 else None

    result = retry(outcome, 300, "the SD-FSMIS result in OHIF")
    if result == "failed":
        req = urllib.request.Request(f"{base}/infer/sdfsmis_seg?image={stack['series']}&output=json",
                                     data=b"", method="POST")
        try:
            detail = urllib.request.urlopen(req, timeout=120).read().decode()
        except urllib.error.HTTPError as err:
            detail = err.read().decode()
        pytest.fail(f"OHIF reported 'Failed to Run Segmentation' ({detail[:500]})")
    # wait until the labelmap stops changing (the viewports repaint with it), then look at it
    last = {"voxels": -1}

    def settled():
        info = d.execute_script(LABELMAP_JS, 0, -1)
        done = info["voxels"] == last["voxels"]
        last.update(info)
        return done

    retry(settled, 30, "a stable labelmap", interval=1.5)
    d.save_screenshot(str(ARTIFACTS / "ohif-sdfsmis.png"))
    truth, annotated = stack["truth"], stack["annotated"]
    near = [z for z in range(annotated - 3, annotated + 4) if z != annotated and 0 <= z < truth.shape[2]]
    pred, counts = labelmap_masks(d, min(near), max(near))
    assert pred.shape[:2] == truth.shape[:2] and counts.size == truth.shape[2], (pred.shape, counts.size, truth.shape)
    # the one annotated slice propagated: the organ is found on the neighbouring slices, where it is
    dice = {z: round(slice_dice(pred[..., z - min(near)], truth[..., z]), 3) for z in near}
    print(f"per-slice Dice around the annotated slice {annotated}: {dice}")
    assert min(dice.values()) > 0.7 and np.mean(list(dice.values())) > 0.85, f"per-slice Dice with the organs: {dice}"
    outside = ~truth.any(axis=(0, 1))
    assert counts[outside].sum() <= 0.05 * counts.sum(), f"organ painted on slices where there is none: {counts}"

    # Active Learning tab: "Update Model" starts the sdfsmis trainer on the server
    retry(lambda: click_text(d, "label", "Active Learning"), 30, "the Active Learning tab")
    retry(lambda: click_text(d, "button", "Update Model"), 30, "the Update Model button")

    def training_seen():
        status = get_json(f"{base}/train/")
        return status if isinstance(status, dict) and status.get("status") in ("RUNNING", "DONE", "ERROR") else None

    status = wait_until(training_seen, 60, "the training task started from OHIF")
    assert status.get("status") in ("RUNNING", "DONE"), status
    wait_until(lambda: stack["train_dir"].is_dir(), 60, "the trainer's output in the test's train_dir")
    d.save_screenshot(str(ARTIFACTS / "ohif-sdfsmis-training.png"))
