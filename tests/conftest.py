"""Shared fixtures: a real MONAI Label server running the SD-FSMIS app (tiny preset, CPU) on phantom studies."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "apps" / "sdfsmis"
STARTUP_TIMEOUT_S = 300
SHAPE = (80, 80, 8)   # small phantoms: fast on CPU, yet big enough for supervoxel training episodes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _console_log_config(path: Path) -> Path:
    """Console-only logging, so the server writes no log file into the app folder."""
    path.write_text(json.dumps({
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"simple": {"format": "[%(asctime)s] [%(process)s] [%(levelname)s] (%(name)s) - %(message)s"}},
        "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "simple"}},
        "root": {"level": "INFO", "handlers": ["console"]},
    }))
    return path


def _kill_tree(proc: subprocess.Popen) -> None:
    """End the server we started and its children (train / batch subprocesses), by pid."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def launch_server(work: Path, studies: Path, env: dict, *args: str) -> tuple[subprocess.Popen, str, Path]:
    """Start `monailabel start_server --app apps/sdfsmis` on `studies` (console logging into
    work/server.log, offline, extra env and server args) and wait for /info/ -> (process, url, log).
    Fails the test with the log tail when the server exits or is not up in STARTUP_TIMEOUT_S."""
    port = _free_port()
    log = work / "server.log"
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(APP), "--studies", str(studies),
           "--host", "127.0.0.1", "--port", str(port), "-l", str(_console_log_config(work / "logging.json")), *args]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1", **env), stdout=out,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/info/", timeout=10) as r:
                if r.status == 200:
                    return proc, url, log
        except OSError:
            pass
        if time.monotonic() > deadline:
            _kill_tree(proc)
            pytest.fail(f"server not up after {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")
        time.sleep(1.0)


@pytest.fixture(scope="module")
def sdfsmis_server(tmp_path_factory):
    """-> dict(url, studies, train_dir, work, log): a running server; killed after the module."""
    from lib.sample import write_sample

    work = tmp_path_factory.mktemp("server")
    studies, train_dir = work / "studies", work / "train"
    write_sample(studies, n=2, shape=SHAPE)
    proc, url, log = launch_server(work, studies, {"SDFSMIS_PSEUDOLABEL_CACHE": str(work / "pseudolabels")},
                                   "--conf", "preset", "tiny", "--conf", "train_dir", str(train_dir),
                                   "--conf", "batch_size", "8")
    try:
        yield {"url": url, "studies": studies, "train_dir": train_dir, "work": work, "log": log}
    finally:
        _kill_tree(proc)
