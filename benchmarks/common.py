"""Shared benchmark helpers: model building, device names, peak memory, a synthetic phantom volume,
the app's server on a study folder."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

PRESETS = ("sd15", "mini", "tiny")


def build(preset: str, reference: str | None, checkpoint: str | None = None):
    """Random-weight model of `preset` (sd15 architecture read from the `reference` config folder),
    or the trained model in `checkpoint`."""
    from lib.model import build_model, load_checkpoint

    if checkpoint:
        return load_checkpoint(checkpoint)
    if preset == "sd15":
        if not reference or not (Path(reference) / "sd15" / "unet" / "config.json").is_file():
            raise SystemExit(f"sd15 needs --reference, a folder with sd15/unet/config.json (got {reference!r})")
        return build_model("sd15", pretrained=False, reference_dir=reference)
    return build_model(preset, pretrained=False)


def device_name(device: torch.device) -> str:
    """GPU name, or the CPU model from /proc/cpuinfo (platform.processor() as a fallback)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = re.search(r"model name\s*:\s*(.+)", text).group(1).strip()
    except (OSError, AttributeError):
        model = platform.processor() or platform.machine()
    return f"{model} (torch threads {torch.get_num_threads()}, os cpus {len(_cpus())})"


def _cpus() -> set[int]:
    try:
        import os

        return os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return {0}


def load_average() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "n/a"


class PeakMemory:
    """Peak memory of a block in MiB: resident set (VmHWM, reset through /proc/self/clear_refs) on CPU,
    torch.cuda.max_memory_allocated on CUDA. `reset_ok` is False where the CPU peak could not be
    reset (then the value is the process's peak so far, from resource.getrusage)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset_ok = True
        self.mib = float("nan")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                self.reset_ok = False
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20
            return
        try:
            status = Path("/proc/self/status").read_text()
            self.mib = int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024
        except (OSError, AttributeError):
            import resource

            self.reset_ok = False
            self.mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Wall-clock seconds of a block (CUDA synchronised at both ends), and the CPU seconds this
    process used meanwhile (all its threads; on a CPU shared with other jobs, cpu_seconds is what
    the work would take on an idle machine with one thread)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = self.cpu_seconds = 0.0

    def __enter__(self):
        sync(self.device)
        self._t, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.seconds = time.perf_counter() - self._t
        self.cpu_seconds = time.process_time() - self._c


def phantom(slices: int, size: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic abdomen-like volume and its organ mask, as (N, H, W) float32 in [0, 1] / {0, 1}.

    A body ellipse with smooth texture, an organ ellipse whose size changes along the slices, noise.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    body = ((yy - 0.5) / 0.42) ** 2 + ((xx - 0.5) / 0.46) ** 2 < 1
    texture = 0.35 + 0.1 * np.sin(12 * xx) * np.cos(9 * yy)
    images, masks = [], []
    for i in range(slices):
        r = 0.08 + 0.07 * np.sin(np.pi * (i + 1) / (slices + 1))
        organ = ((yy - 0.45) / r) ** 2 + ((xx - 0.62) / (1.3 * r)) ** 2 < 1
        img = np.where(body, texture, 0.02) + 0.35 * organ + rng.normal(0, 0.03, (size, size))
        images.append(np.clip(img, 0, 1))
        masks.append(organ)
    return np.stack(images).astype(np.float32), np.stack(masks).astype(np.float32)


def dice(a: torch.Tensor, b: torch.Tensor) -> float:
    """Dice of two boolean masks; 1.0 when both are empty."""
    a, b = a.bool(), b.bool()
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2 * int((a & b).sum()) / total


def emit_json(record: dict) -> None:
    print("JSON " + json.dumps(record, sort_keys=True), flush=True)


def apply_device_args(args) -> "torch.device":
    """--threads, --device, --dtype checks shared by both benchmarks -> the torch device."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.dtype != "fp32" and args.device == "cpu":
        raise SystemExit(f"--dtype {args.dtype} is for --device cuda; the CPU path runs in fp32")
    return torch.device(args.device)


@contextlib.contextmanager
def running_server(studies: Path, log: Path, conf=(), env=None, timeout: float = 300.0, logging_config=None):
    """`monailabel start_server --app apps/sdfsmis` on `studies` (a free port, output into `log`, extra
    `--conf` pairs and environment) -> yields (url, process) once /info/ answers; stopped at the end.
    SystemExit with the log tail when it exits or is not up within `timeout` seconds."""
    root = Path(__file__).resolve().parents[1]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(root / "apps" / "sdfsmis"),
           "--studies", str(studies), "--host", "127.0.0.1", "--port", str(port)]
    if logging_config:
        cmd += ["-l", str(logging_config)]
    for key, value in conf:
        cmd += ["--conf", key, value]
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=root, env=dict(os.environ, **(env or {})), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"server exited with {proc.returncode}:\n{Path(log).read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/info/", timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit(f"server not up after {timeout:.0f} s; log: {log}") from None
                time.sleep(1)
        yield url, proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
