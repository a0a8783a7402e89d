"""Served speed: a 36-slice volume with two organs annotated on one slice, through the real server.

    python -m benchmarks.served_speed --data ../shared/data/abd-ct --threads 1 2 --walkers registration network

Builds the case (with --data: an Abd-CT volume cropped to --slices slices around its liver and
spleen, both annotated on one slice; without: the synthetic phantom of lib.sample), then
- in process: `propagate` as the app serves it (embedded model, chained, gated), best and median of
  --repeats runs, with a breakdown in CPU seconds: registration, warping, network, gate, the rest;
- served: starts `python -m monailabel.main start_server --app apps/sdfsmis` on a free port and times
  `POST /infer/sdfsmis` with the annotation uploaded (one untimed warm-up, then --repeats requests),
  wall seconds and the server process's CPU seconds (`--conf torch_threads` = the thread count).
Several --threads values time both paths with each in turn, in one run (one server per value); several
--walkers (the app's `walker`, a request option) each in turn on the same server.
Wall seconds follow the load of a shared CPU; CPU seconds (one thread) much less so.
Prints the device, the load average, a table and a JSON line. Not a test: nothing is asserted.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import device_name, emit_json, load_average, running_server
from lib.pipeline.options import WALKERS, PropagateOptions

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "apps" / "sdfsmis"
CT_LIVER, CT_SPLEEN = 6, 1          # BTCV label ids (abd-ct)


# ---- the case ------------------------------------------------------------------------------------
def ct_case(data: str, volume: int, slices: int):
    """Abd-CT volume `volume` cropped to `slices` slices centred on its liver + spleen extent.
    -> (image (H, W, Z), one-slice annotation uint8 (H, W, Z), ground truth (H, W, Z), spacing, z, organs)."""
    import SimpleITK as sitk

    from lib.infers.volume_io import to_array

    img = sitk.ReadImage(str(Path(data) / f"image_{volume}.nii.gz"))
    image = to_array(img).astype(np.float32)
    truth = to_array(sitk.ReadImage(str(Path(data) / f"label_{volume}.nii.gz")))
    both = np.isin(truth, [CT_LIVER, CT_SPLEEN]).reshape(-1, truth.shape[-1]).any(axis=0)
    zs = np.flatnonzero(both)
    centre = (zs.min() + zs.max()) // 2
    lo = int(np.clip(centre - slices // 2, 0, truth.shape[-1] - slices))
    image, truth = image[..., lo:lo + slices], truth[..., lo:lo + slices]
    return _annotate(image, truth, [CT_LIVER, CT_SPLEEN], img.GetSpacing())


def phantom_case(slices: int, size: int = 256):
    """The lib.sample phantom (liver 1, spleen 4) at size x size x slices."""
    from lib.sample import LIVER, SPACING, SPLEEN, phantom

    image, truth = phantom((size, size, slices), seed=1)
    return _annotate(image, truth, [LIVER, SPLEEN], SPACING)


def _annotate(image, truth, organs, spacing):
    """Annotate `organs` on the slice where the smaller of them is largest (both must show)."""
    areas = np.stack([(truth == v).reshape(-1, truth.shape[-1]).sum(axis=0) for v in organs]).min(axis=0)
    z = int(np.argmax(areas))
    if areas[z] == 0:
        raise SystemExit("no slice shows both organs")
    ann = np.zeros(truth.shape, np.uint8)
    ann[..., z] = np.where(np.isin(truth[..., z], organs), truth[..., z], 0)
    return image, ann, truth, tuple(float(s) for s in spacing), z, organs


def save(arr: np.ndarray, spacing, path: Path) -> Path:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(arr)))   # (H, W, Z) -> sitk index (i, j, k)
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))
    return path


def dice(pred: np.ndarray, truth: np.ndarray, organs, z: int | None = None) -> dict:
    """Per-organ 3D Dice over the slices other than the annotated one `z` (None: over every slice)."""
    keep = np.ones(truth.shape[-1], bool)
    if z is not None:
        keep[z] = False
    out = {}
    for v in organs:
        p, t = pred[..., keep] == v, truth[..., keep] == v
        out[str(v)] = float(2 * (p & t).sum() / max(1, p.sum() + t.sum()))
    return out


# ---- in process ----------------------------------------------------------------------------------
class Breakdown:
    """CPU seconds per part of the pipeline, by wrapping the functions that do the work.

    Registration and warping may run in several threads at once (Step aligns a batch on `workers`
    threads), each on one ITK thread: they are counted in CPU seconds of their own thread. The
    network and the gate run in the calling thread with torch's thread pool: process CPU seconds."""

    PARTS = {"registration": [("lib.transforms.align", "SliceAligner", "register")],
             "warp": [("lib.transforms.align", "SliceAligner", "_resample")],
             "network": [("lib.model.sdfsmis", "SDFSMIS", name)
                         for name in ("encode_support", "encode_supports", "predict", "decode_prior")],
             "gate": [("lib.transforms.postprocess", None, "intensity_gate")]}
    THREAD_CLOCK = {"registration", "warp"}
    _one: "Breakdown | None" = None

    @classmethod
    def installed(cls) -> "Breakdown":
        """The process's one Breakdown (the methods are patched on their classes once)."""
        if cls._one is None:
            cls._one = cls()
        return cls._one

    def __init__(self):
        import importlib
        import threading

        self.cpu = dict.fromkeys(self.PARTS, 0.0)
        self.slices = 0
        self.local, self.lock = threading.local(), threading.Lock()
        for part, targets in self.PARTS.items():
            for module, cls, name in targets:
                owner = importlib.import_module(module)
                owner = getattr(owner, cls) if cls else owner
                if hasattr(owner, name):
                    setattr(owner, name, self._wrap(part, getattr(owner, name)))

    def _wrap(self, part, fn):
        clock = time.thread_time if part in self.THREAD_CLOCK else time.process_time

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if getattr(self.local, "depth", 0):   # nested call (counted by the outer one)
                return fn(*args, **kwargs)
            self.local.depth = 1
            if fn.__name__ == "predict":           # queries through the network (index: of fewer slices)
                index = kwargs.get("index")
                self.slices += len(args[1]) if index is None else len(index)
            start = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                with self.lock:
                    self.cpu[part] += clock() - start
                self.local.depth = 0
        return timed

    def reset(self):
        self.cpu = dict.fromkeys(self.PARTS, 0.0)
        self.slices = 0


def in_process(image_path: Path, label_path: Path, repeats: int, walker: str) -> dict:
    """Read, propagate (the app's defaults, this walker) and write, as the infer task does."""
    from lib.pipeline import propagate
    from lib.infers.volume_io import read_image, read_volume, to_array, write_label
    from lib.model import load_checkpoint

    breakdown = Breakdown.installed()      # wrap before the model exists: methods are patched on the class
    model = load_checkpoint(APP / "model").eval()
    runs, label = [], None
    for i in range(repeats + 1):           # the first run warms up
        breakdown.reset()
        t0, c0 = time.perf_counter(), time.process_time()
        image, reference = read_volume(image_path)
        ann = to_array(read_image(label_path))
        t1 = time.perf_counter()
        result = propagate(model, image, ann, PropagateOptions.for_model(model, walker=walker))
        t2 = time.perf_counter()
        os.remove(write_label(result.label, reference))
        t3, c3 = time.perf_counter(), time.process_time()
        if i:
            cpu = dict(breakdown.cpu)
            cpu["rest"] = (c3 - c0) - sum(cpu.values())
            runs.append({"wall_s": t3 - t0, "cpu_s": c3 - c0, "read_s": t1 - t0, "propagate_s": t2 - t1,
                         "write_s": t3 - t2, "cpu": cpu, "steps": breakdown.slices})
        label = result.label
    best = min(runs, key=lambda r: r["wall_s"])
    return {"best": best, "median_wall_s": statistics.median(r["wall_s"] for r in runs),
            "median_cpu_s": statistics.median(r["cpu_s"] for r in runs), "label": label}


# ---- served ----------------------------------------------------------------------------------------
def served(work: Path, image_id: str, label_path: Path, repeats: int, threads: int, timeout: float,
           walkers: list[str]) -> dict:
    """Start the server on `work`/studies, time POST /infer/sdfsmis with each walker -> {walker: record};
    the server is stopped at the end."""
    import psutil
    from monailabel.client import MONAILabelClient

    from lib.infers.volume_io import read_image, to_array

    logcfg = work / "logging.json"
    logcfg.write_text(json.dumps({"version": 1, "disable_existing_loggers": False,
                                  "handlers": {"console": {"class": "logging.StreamHandler"}},
                                  "root": {"level": "WARNING", "handlers": ["console"]}}))
    env = {"HF_HUB_OFFLINE": "1", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    conf = [("train_dir", str(work / "train")), ("torch_threads", str(threads))]
    with running_server(work / "studies", work / "server.log", conf=conf, env=env,
                        timeout=timeout, logging_config=logcfg) as (url, proc):
        client = MONAILabelClient(url, tmpdir=str(work / "client"))
        server = psutil.Process(proc.pid)
        out = {}
        for walker in walkers:
            times, cpus, latencies, path = [], [], [], None
            for i in range(repeats + 1):     # the first request warms up
                t, c = time.perf_counter(), sum(server.cpu_times()[:2])
                path, params = client.infer("sdfsmis", image_id, {"walker": walker}, label_in=str(label_path))
                if i:
                    times.append(time.perf_counter() - t)
                    cpus.append(sum(server.cpu_times()[:2]) - c)
                    latencies.append(params.get("latencies", {}))
            best = int(np.argmin(times))
            out[walker] = {"best_s": times[best], "median_s": statistics.median(times), "times_s": times,
                           "best_cpu_s": cpus[best], "median_cpu_s": statistics.median(cpus),
                           "server_latencies": latencies[best], "label": to_array(read_image(path))}
    return out


# ---- report --------------------------------------------------------------------------------------
def report(rec: dict) -> None:
    print(f"served speed: {rec['case']} {rec['shape'][0]}x{rec['shape'][1]}x{rec['shape'][2]}, organs "
          f"{rec['organs']} annotated on slice {rec['annotated_slice']}; device={rec['device_name']} "
          f"load={rec['load_average']} threads={rec['threads']} repeats={rec['repeats']}")
    print(f"  {'path':10s} {'walker':12s} {'threads':>7s} {'best s':>8s} {'median s':>9s} {'cpu s':>7s}  "
          "breakdown (cpu s of the best run)")
    for run in rec["runs"]:
        t, w, p, s = run["threads"], run["walker"], run.get("in_process"), run.get("served")
        if p:
            print(f"  {'in-process':10s} {w:12s} {t:7d} {p['best_s']:8.2f} {p['median_s']:9.2f} {p['best_cpu_s']:7.2f}  "
                  + "  ".join(f"{k} {v:.2f}" for k, v in p["best_cpu"].items())
                  + f"  | read {p['read_s']:.2f} s, propagate {p['propagate_s']:.2f} s, write {p['write_s']:.2f} s, "
                  f"{p['steps']} network steps")
        if s:
            print(f"  {'served':10s} {w:12s} {t:7d} {s['best_s']:8.2f} {s['median_s']:9.2f} {s['best_cpu_s']:7.2f}  "
                  "server latencies of the best: " + ", ".join(f"{k} {v}" for k, v in s["server_latencies"].items()))
        if run.get("dice"):
            print(f"  {w}, {t} thread(s): dice (other slices) " + ", ".join(f"{k}: {v:.4f}" for k, v in run["dice"].items())
                  + ("" if run.get("served_equals_in_process") is None
                     else f"; served label == in-process label: {run['served_equals_in_process']}"))


def timed_runs(args, threads: int, work: Path, image_path: Path, label_path: Path, truth, organs, z) -> list[dict]:
    """Both paths with `threads` torch threads (here and in the server), each walker -> the runs' records."""
    torch.set_num_threads(threads)
    runs = {w: {"threads": threads, "walker": w} for w in args.walkers}
    labels = {w: {} for w in args.walkers}
    if not args.skip_in_process:
        for w in args.walkers:
            r = in_process(image_path, label_path, args.repeats, w)
            b = r["best"]
            runs[w]["in_process"] = {"best_s": b["wall_s"], "median_s": r["median_wall_s"], "best_cpu_s": b["cpu_s"],
                                     "median_cpu_s": r["median_cpu_s"], "best_cpu": b["cpu"], "read_s": b["read_s"],
                                     "propagate_s": b["propagate_s"], "write_s": b["write_s"], "steps": b["steps"]}
            labels[w]["in_process"] = r["label"]
    if not args.skip_server:
        for w, s in served(work, "case", label_path, args.repeats, threads, args.startup_timeout, args.walkers).items():
            labels[w]["served"] = s.pop("label")
            runs[w]["served"] = s
    for w, run in runs.items():
        first = next(iter(labels[w].values()), None)
        if first is not None:
            run["dice"] = dice(first, truth, organs, z)
        if len(labels[w]) == 2:
            run["served_equals_in_process"] = bool(np.array_equal(labels[w]["served"], labels[w]["in_process"]))
    return list(runs.values())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="the abd-ct folder (image_K / label_K); default: synthetic phantom")
    p.add_argument("--volume", type=int, default=14, help="abd-ct volume K [14: 86 slices of 5 mm]")
    p.add_argument("--slices", type=int, default=36, help="slices in the volume [36]")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each path after one warm-up [3]")
    p.add_argument("--threads", type=int, nargs="+", default=[1],
                   help="torch threads, here and in the server (--conf torch_threads); several: each in turn [1]")
    p.add_argument("--walkers", nargs="+", choices=WALKERS, default=[PropagateOptions.walker],
                   help="the app's `walker` (a request option); several: each in turn [the app's default]")
    p.add_argument("--skip-server", action="store_true", help="time the in-process pipeline only")
    p.add_argument("--skip-in-process", action="store_true", help="time the server only")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for the server [300]")
    args = p.parse_args(argv)
    if min(args.threads) < 1:
        raise SystemExit("--threads: 1 or more")
    if args.data:
        image, ann, truth, spacing, z, organs = ct_case(args.data, args.volume, args.slices)
        case = f"abd-ct volume {args.volume}"
    else:
        image, ann, truth, spacing, z, organs = phantom_case(args.slices)
        case = "phantom"
    rec = {"case": case, "shape": list(image.shape), "organs": organs, "annotated_slice": z,
           "device_name": device_name(torch.device("cpu")), "load_average": load_average(),
           "threads": args.threads, "repeats": args.repeats, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "studies").mkdir()
        image_path = save(image, spacing, work / "studies" / "case.nii.gz")
        label_path = save(ann, spacing, work / "case_label.nii.gz")
        for threads in args.threads:
            for run in timed_runs(args, threads, work, image_path, label_path, truth, organs, z):
                rec["runs"].append(dict(run, load_average_end=load_average()))
    rec["load_average_end"] = load_average()
    report(rec)
    emit_json(rec)
    return rec


if __name__ == "__main__":
    main()
